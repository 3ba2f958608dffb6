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
    let q = qcow2_of(&raw, &d.path().join("disk.qcow2"));
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

/// A 4Kn device (4096-byte logical blocks, CDI issue 4175) with `CACHE_MODE=TRYNONE`:
/// aligned writes go through O_DIRECT, and an image whose size is a multiple of 512 but
/// not of 4096 still lands, its last partial block written through the page cache,
/// whether it ends in data or in a zero run (which is punched only where block-aligned).
#[test]
fn a_4kn_block_volume_takes_o_direct_and_an_unaligned_tail() {
    let d = tmp();
    // 96 MiB + 3584 bytes: the last logical block of the image is partial.
    let size = (96u64 << 20) + 3584;
    let mk = |name: &str, writes: &[(u64, u64, u8)]| {
        let raw = d.path().join(format!("{name}.raw"));
        raw_fixture(&raw, &size.to_string(), writes);
        let q = qcow2_of(&raw, &d.path().join(format!("{name}.qcow2")));
        (raw, q)
    };
    // One ends in a zero run over the partial block, one in data across it.
    let zero_tail = mk(
        "zero-tail",
        &[(1 << 20, 4 << 20, 0xab), (64 << 20, 1 << 20, 0x42)],
    );
    let data_tail = mk(
        "data-tail",
        &[(2 << 20, 1 << 20, 0x5a), (size - 5120, 5120, 0xcd)],
    );
    for (raw, q) in [&zero_tail, &data_tail] {
        let want = std::fs::read(qemu_reference(raw, d.path())).expect("ref");
        for src in [raw, q] {
            let name = src
                .file_name()
                .and_then(|n| n.to_str())
                .expect("name")
                .to_string();
            let backing = d.path().join(format!("backing-{name}"));
            let Some(lo) = Loop::with_sector(&backing, 100 << 20, 4096) else {
                return;
            };
            let run = tmp();
            let o = Importer::new(run.path())
                .file(src)
                .env("CACHE_MODE", "TRYNONE")
                .block_device(&lo.dev)
                .run();
            o.assert_success();
            assert!(
                !o.stderr.contains("O_DIRECT not available"),
                "{name}: O_DIRECT refused on a 4Kn device\n{}",
                o.stderr
            );
            let dev = std::fs::read(&lo.dev).expect("read device");
            assert!(
                dev[..want.len()] == want[..],
                "{name}: the device reads back as qemu-img's output"
            );
            let kept = allocated(&backing);
            assert!(
                kept <= 12 << 20,
                "{name}: {kept} bytes still allocated for at most 5 MiB of data\n{}",
                o.stderr
            );
        }
    }
}

/// `--target-zeroed` (`FERRYDISK_TARGET_ZEROED`): the user vouches that the volume reads
/// as zeros, so zero runs are not even punched. On a fresh (sparse) volume the disk
/// reads back equal; on a dirty one the holes show the old bytes, which is what the flag
/// trusts away, and proves nothing was written there. Preallocation ignores it.
#[test]
fn target_zeroed_skips_zero_runs() {
    let d = tmp();
    let raw = d.path().join("disk.raw");
    raw_fixture(&raw, "64M", &[(1 << 20, 2 << 20, 0xab)]);
    let want = std::fs::read(&raw).expect("raw");

    let fresh = d.path().join("fresh");
    std::fs::File::create(&fresh)
        .and_then(|f| f.set_len(64 << 20))
        .expect("sparse backing");
    let Some(lo) = Loop::attach(&fresh, 512) else {
        return;
    };
    let run = tmp();
    let o = Importer::new(run.path())
        .file(&raw)
        .env("FERRYDISK_TARGET_ZEROED", "true")
        .block_device(&lo.dev)
        .run();
    o.assert_success();
    assert!(o.stderr.contains("--target-zeroed"), "{}", o.stderr);
    assert!(
        std::fs::read(&lo.dev).expect("read") == want,
        "fresh volume"
    );
    assert!(allocated(&fresh) <= 4 << 20, "only the data was written");
    drop(lo);

    let dirty = d.path().join("dirty");
    let Some(lo) = Loop::new(&dirty, 64 << 20) else {
        return;
    };
    let o = Importer::new(tmp().path())
        .file(&raw)
        .arg("--target-zeroed")
        .block_device(&lo.dev)
        .run();
    o.assert_success();
    let dev = std::fs::read(&lo.dev).expect("read");
    assert!(
        dev[1 << 20..3 << 20] == want[1 << 20..3 << 20],
        "data written"
    );
    assert!(dev[..1 << 20].iter().all(|&b| b == 0xff), "hole left alone");
    assert!(dev[3 << 20..].iter().all(|&b| b == 0xff), "hole left alone");

    let o = Importer::new(tmp().path())
        .file(&raw)
        .env("FERRYDISK_TARGET_ZEROED", "true")
        .env("PREALLOCATION", "true")
        .block_device(&lo.dev)
        .run();
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(!o.stderr.contains("--target-zeroed"), "{}", o.stderr);
    assert!(
        std::fs::read(&lo.dev).expect("read") == want,
        "preallocation zeroes"
    );
}

/// The acceptance figure: a 2 GiB-virtual qcow2 with 200 MiB of data, onto a
/// 2 GiB volume whose every block is allocated (fallocate: a reused thin volume), leaves
/// at most 250 MiB allocated and reads back equal (compared with `cmp`, not in memory).
#[test]
fn a_2gib_image_with_200mib_of_data_leaves_at_most_250mib_allocated() {
    let d = tmp();
    let raw = d.path().join("disk.raw");
    // 200 MiB of data in ten 20 MiB runs spread over the disk.
    let writes: Vec<(u64, u64, u8)> = (0..10u64)
        .map(|i| (i * (200 << 20) + (3 << 20), 20 << 20, 0x11 + i as u8))
        .collect();
    raw_fixture(&raw, "2G", &writes);
    let q = qcow2_of(&raw, &d.path().join("disk.qcow2"));
    let backing = d.path().join("backing");
    let st = std::process::Command::new("fallocate")
        .args(["-l", "2G"])
        .arg(&backing)
        .status()
        .expect("fallocate");
    assert!(st.success());
    assert!(allocated(&backing) >= 2 << 30, "starts fully allocated");
    let Some(lo) = Loop::attach(&backing, 512) else {
        return;
    };
    let o = Importer::new(tmp().path())
        .file(&q)
        .block_device(&lo.dev)
        .run();
    o.assert_success();
    let kept = allocated(&backing);
    assert!(
        kept <= 250 << 20,
        "{kept} bytes allocated for 200 MiB of data"
    );
    let st = std::process::Command::new("cmp")
        .arg(&raw)
        .arg(&lo.dev)
        .status()
        .expect("cmp");
    assert!(st.success(), "the device reads back as the raw image");
    eprintln!("allocated after import: {} MiB", kept >> 20);
}
