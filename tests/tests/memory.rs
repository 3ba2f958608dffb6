//! Memory that images control (issue 11, section 2): images crafted to grow a streaming
//! importer's bookkeeping (tests/support/memimages.py makes them from qemu-img output)
//! are imported over HTTP, streamed, inside a 128 MiB memory cgroup as a pod's limit
//! would set it. Each must end in success with the right bytes or a one-line refusal,
//! with a peak RSS of at most 64 MiB, and never be killed.

use ferrydisk_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const LIMIT: u64 = 128 << 20;
const PEAK_KIB: u64 = 64 << 10;

/// A cgroup v1 memory group with a limit, removed on drop; `None` where the machine has
/// no writable v1 memory controller (then only the RSS is checked).
struct MemCgroup(PathBuf);

impl MemCgroup {
    fn new(name: &str) -> Option<Self> {
        let dir = PathBuf::from("/sys/fs/cgroup/memory").join(name);
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).ok()?;
        std::fs::write(dir.join("memory.limit_in_bytes"), LIMIT.to_string()).ok()?;
        Some(MemCgroup(dir))
    }

    /// Starts the peak over (the group is reused for every image).
    fn reset_peak(&self) {
        let _ = std::fs::write(self.0.join("memory.max_usage_in_bytes"), "0");
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.0.join(file)).unwrap_or_default()
    }

    fn oom_kills(&self) -> u64 {
        self.read("memory.oom_control")
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

struct Run {
    code: Option<i32>,
    termination: String,
    rss_kib: u64,
    cgroup_peak: Option<u64>,
    oom_kills: u64,
}

fn import(url: &str, dir: &Path, cg: Option<&MemCgroup>) -> Run {
    let termination = dir.join("termination-log");
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch).expect("scratch");
    let rss = dir.join("rss");
    // `sh` joins the cgroup, then becomes /usr/bin/time, which runs the importer.
    let script = match cg {
        Some(cg) => format!("echo $$ > {}/cgroup.procs && exec \"$@\"", cg.0.display()),
        None => "exec \"$@\"".into(),
    };
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss)
        .arg(bin("importer"))
        .arg("--endpoint")
        .arg(url)
        .arg("--dest")
        .arg(dir.join("disk.img"))
        .arg("--termination-log")
        .arg(&termination)
        .arg("--metrics-addr")
        .arg("none")
        .arg("--scratch")
        .arg(&scratch)
        .arg("--block-device")
        .arg(dir.join("no-block-device"))
        .env_clear()
        .env("IMPORTER_SOURCE", "http")
        .env("IMPORTER_CONTENTTYPE", "kubevirt")
        .output()
        .expect("run importer");
    let rss_kib = std::fs::read_to_string(&rss)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no RSS for {url}: {}", String::from_utf8_lossy(&out.stderr)));
    Run {
        code: out.status.code(),
        termination: std::fs::read_to_string(&termination).unwrap_or_default(),
        rss_kib,
        cgroup_peak: cg.and_then(|c| c.read("memory.max_usage_in_bytes").trim().parse().ok()),
        oom_kills: cg.map_or(0, MemCgroup::oom_kills),
    }
}

/// The 8 MiB grains of vmdk-8m-grains.vmdk: grain `i` is filled with `1 + i % 200`.
fn check_vmdk_pattern(disk: &Path) {
    let data = std::fs::read(disk).expect("disk");
    assert_eq!(data.len(), 64 << 20);
    for (i, grain) in data.chunks(8 << 20).enumerate() {
        let want = 1 + (i % 200) as u8;
        assert!(grain.iter().all(|&b| b == want), "grain {i}");
    }
}

#[test]
fn hostile_images_stay_under_64_mib_in_a_128_mib_cgroup() {
    let images = tempfile::tempdir().expect("tmp");
    sh(Command::new("python3")
        .arg(root().join("tests/support/memimages.py"))
        .arg(images.path()));
    let server = HttpServer::start(images.path(), &[]);
    let cg = MemCgroup::new(&format!("ferrydisk-memtest-{}", std::process::id()));
    if cg.is_none() {
        eprintln!("no writable cgroup v1 memory controller: checking RSS only");
    }
    // (image, expected: Ok(reference) or Err(refusal text))
    let cases: &[(&str, Result<&str, &str>)] = &[
        ("qcow2-tables-first.qcow2", Ok("qemu")),
        ("qcow2-tables-first.qcow2.gz", Ok("qemu")),
        ("qcow2-far-l2.qcow2", Err("is still referenced")),
        ("qcow2-far-l2.qcow2.gz", Err("is still referenced")),
        ("qcow2-prealloc-full.qcow2", Ok("qemu")),
        // Issue 27 (6): 1 GiB of unreferenced 512-byte clusters before the L1 table,
        // spooled to the scratch volume: 208-211 MiB peak when the spool indexed every
        // cluster, one entry now.
        ("qcow2-junk-first.qcow2", Ok("qemu")),
        ("qcow2-junk-first.qcow2.gz", Ok("qemu")),
        ("vmdk-8m-grains.vmdk", Ok("pattern")),
        ("vmdk-huge-grains.vmdk", Err("more than 8388608 bytes")),
        ("vhd-512b-blocks.vhd", Ok("qemu")),
        ("vmdk-1-sector-grains.vmdk", Ok("qemu")),
        ("pax-header.tar", Err("headers before an entry")),
        ("pax-header.tar.gz", Err("headers before an entry")),
        ("gnu-longname.tar", Err("headers before an entry")),
        ("gnu-longname.tar.gz", Err("headers before an entry")),
    ];
    let mut report = Vec::new();
    for (name, want) in cases {
        let run = tempfile::tempdir().expect("tmp");
        if let Some(cg) = &cg {
            cg.reset_peak();
        }
        let r = import(&server.url(name), run.path(), cg.as_ref());
        report.push(format!(
            "{name}: exit {:?}, peak RSS {} KiB, cgroup peak {:?} (page cache included), OOM kills {}",
            r.code, r.rss_kib, r.cgroup_peak, r.oom_kills
        ));
        assert_eq!(r.oom_kills, 0, "{name} was OOM-killed");
        assert!(r.code.is_some(), "{name} died by a signal");
        assert!(r.rss_kib <= PEAK_KIB, "{name}: peak RSS {} KiB", r.rss_kib);
        let disk = run.path().join("disk.img");
        match want {
            Ok("qemu") => {
                assert_eq!(r.code, Some(0), "{name}: {}", r.termination);
                let src = images.path().join(name.trim_end_matches(".gz"));
                assert_same_bytes(&disk, &qemu_reference(&src, run.path()));
            }
            Ok(_) => {
                assert_eq!(r.code, Some(0), "{name}: {}", r.termination);
                check_vmdk_pattern(&disk);
            }
            Err(text) => {
                assert_eq!(r.code, Some(1), "{name}: {}", r.termination);
                assert!(!r.termination.contains('\n'));
                assert!(r.termination.contains(text), "{name}: {}", r.termination);
                assert_eq!(
                    std::fs::metadata(&disk).map(|m| m.len()).unwrap_or(0),
                    0,
                    "{name}: a refused image leaves an empty disk"
                );
            }
        }
    }
    eprintln!("{}", report.join("\n"));
}
