//! Heap buffers aligned for O_DIRECT, without `unsafe`: over-allocate by one sector and
//! use the aligned window. The Vec is never resized, so the window never moves.

use super::SECTOR;

pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let raw = vec![0u8; len + SECTOR];
        let start = raw.as_ptr().align_offset(SECTOR);
        assert!(
            start < SECTOR,
            "Vec<u8> can always be aligned within one sector"
        );
        AlignedBuf { raw, start, len }
    }

    pub fn capacity(&self) -> usize {
        self.len
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned() {
        for len in [1, 4096, 1 << 20] {
            let b = AlignedBuf::new(len);
            assert_eq!(b.as_slice().as_ptr() as usize % SECTOR, 0);
            assert_eq!(b.as_slice().len(), len);
        }
    }
}
