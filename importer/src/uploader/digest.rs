//! The file's sha256, computed while it is sent: a hasher that can be taken back to any
//! offset the server reports after a drop, from a snapshot at most [`SNAPSHOT_EVERY`]
//! bytes before it (the bytes since are hashed again from the local file, never sent
//! again).

use sha2::{Digest, Sha256};
use std::io::{self, Read, Seek, SeekFrom};

/// Bytes between two snapshots of the hasher (a snapshot is ~100 bytes).
pub const SNAPSHOT_EVERY: u64 = 64 << 20;

pub struct Ledger {
    hasher: Sha256,
    /// Bytes hashed: `[0, pos)` of the file.
    pos: u64,
    /// `(offset, hasher state there)`, ascending, the first at 0.
    snapshots: Vec<(u64, Sha256)>,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            hasher: Sha256::new(),
            pos: 0,
            snapshots: vec![(0, Sha256::new())],
        }
    }
}

impl Ledger {
    #[cfg(test)]
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// `data`, the file's bytes at `at`; bytes already hashed (a chunk sent again) or
    /// past a gap are not counted twice or out of order.
    pub fn update(&mut self, at: u64, data: &[u8]) {
        let end = at + data.len() as u64;
        if at > self.pos || end <= self.pos {
            return;
        }
        self.hasher.update(&data[(self.pos - at) as usize..]);
        let before = self.pos;
        self.pos = end;
        if before / SNAPSHOT_EVERY != end / SNAPSHOT_EVERY {
            self.snapshots.push((end, self.hasher.clone()));
        }
    }

    /// Takes the hash back (or forward) to `to`, reading what is needed from `file`.
    pub fn rewind(&mut self, to: u64, file: &mut std::fs::File) -> io::Result<()> {
        if to == self.pos {
            return Ok(());
        }
        if to < self.pos {
            self.snapshots.retain(|(p, _)| *p <= to);
            let (p, h) = self.snapshots.last().cloned().unwrap_or((0, Sha256::new()));
            self.pos = p;
            self.hasher = h;
        }
        file.seek(SeekFrom::Start(self.pos))?;
        let mut r = file.take(to - self.pos);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            let at = self.pos;
            self.update(at, &buf[..n]);
        }
        if self.pos != to {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file ends at {} before byte {to}", self.pos),
            ));
        }
        Ok(())
    }

    /// `sha256:<hex>` of `[0, pos)`.
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn rewinds_to_any_offset_and_agrees_with_one_pass() {
        let data: Vec<u8> = (0..(3 * SNAPSHOT_EVERY / 2 + 12345))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let mut f = tempfile::tempfile().expect("tmp");
        f.write_all(&data).expect("write");
        let whole = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
        let mut l = Ledger::default();
        for (i, c) in data.chunks(1 << 20).enumerate() {
            l.update((i as u64) << 20, c);
        }
        assert_eq!(l.digest(), whole);
        // A drop: the server kept less than was sent.
        l.rewind(SNAPSHOT_EVERY + 777, &mut f).expect("rewind");
        assert_eq!(l.pos(), SNAPSHOT_EVERY + 777);
        let at = l.pos() as usize;
        l.update(at as u64, &data[at..]);
        assert_eq!(l.digest(), whole);
        // A chunk sent twice counts once.
        l.update(0, &data[..10]);
        assert_eq!(l.digest(), whole);
        // Forward from nothing (a client taking up an upload another run began).
        let mut fresh = Ledger::default();
        fresh.rewind(data.len() as u64, &mut f).expect("forward");
        assert_eq!(fresh.digest(), whole);
    }
}
