//! Comparing disks: byte for byte, and by allocation.

use std::io::Read;
use std::path::Path;

/// Asserts two files hold the same bytes (streamed, so large disks are fine).
pub fn assert_same_bytes(got: &Path, want: &Path) {
    let (mut a, mut b) = (open(got), open(want));
    let (la, lb) = (len(got), len(want));
    assert_eq!(
        la,
        lb,
        "{} is {la} bytes, {} is {lb}",
        got.display(),
        want.display()
    );
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = read_full(&mut a, &mut ba);
        let m = read_full(&mut b, &mut bb);
        assert_eq!(n, m);
        if n == 0 {
            return;
        }
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            panic!(
                "{} differs from {} at byte {}",
                got.display(),
                want.display(),
                off + i as u64
            );
        }
        off += n as u64;
    }
}

fn open(p: &Path) -> std::fs::File {
    std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

fn len(p: &Path) -> u64 {
    std::fs::metadata(p)
        .map(|m| m.len())
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).expect("read") {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}
