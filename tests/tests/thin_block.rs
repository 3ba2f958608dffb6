//! Thin block volumes stay thin (CDI issue 3614): zero runs on a block destination are
//! deallocated with `fallocate(PUNCH_HOLE)` (guaranteed zeros, or refused), not zeroed in
//! place. The volume is a loop device over a file pre-filled with 0xff (a reused, fully
//! allocated volume); the loop driver turns a punch into a hole in that file, so its
//! allocated blocks show what a thin pool would keep. With `PREALLOCATION=true` the
//! device ends up allocated, as asked.

use ferrydisk_tests::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

#[test]
fn zero_runs_on_a_thin_block_volume_are_deallocated() {
    let d = tmp();
    // 192 MiB virtual, 8 MiB of data in two regions, the rest holes.
    let raw = d.path().join("disk.raw");
    raw_fixture(
        &raw,
        "192M",
        &[(1 << 20, 4 << 20, 0xab), (150 << 20, 4 << 20, 0x42)],
    );
    let q = d.path().join("disk.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().expect("utf8"),
        q.to_str().expect("utf8"),
    ]);
    let reference = qemu_reference(&raw, d.path());
    let want = std::fs::read(&reference).expect("ref");
    for (src, name) in [(&raw, "raw"), (&q, "qcow2")] {
        let backing = d.path().join(format!("backing-{name}"));
        let Some(lo) = Loop::new(&backing, 192 << 20) else {
            return;
        };
        assert!(allocated(&backing) >= 192 << 20, "starts fully allocated");
        let run = tmp();
        let o = Importer::new(run.path())
            .file(src)
            .block_device(&lo.dev)
            .run();
        o.assert_success();
        let dev = std::fs::read(&lo.dev).expect("read device");
        assert!(
            dev == want,
            "{name}: the device reads back as qemu-img's output"
        );
        let kept = allocated(&backing);
        assert!(
            kept <= 12 << 20,
            "{name}: {kept} bytes still allocated for 8 MiB of data\n{}",
            o.stderr
        );
    }

    // PREALLOCATION=true: zeroed in place, allocated.
    let backing = d.path().join("backing-prealloc");
    let Some(lo) = Loop::new(&backing, 192 << 20) else {
        return;
    };
    let run = tmp();
    let o = Importer::new(run.path())
        .file(&raw)
        .env("PREALLOCATION", "true")
        .block_device(&lo.dev)
        .run();
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.termination.contains("\"preallocationApplied\":true"),
        "{}",
        o.termination
    );
    assert_eq!(std::fs::read(&lo.dev).expect("read"), want);
    assert!(
        allocated(&backing) >= 190 << 20,
        "preallocated stays allocated"
    );
}
