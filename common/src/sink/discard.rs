//! A target that keeps nothing: for checking that an image converts (a qcow2 kept as
//! qcow2 is validated by converting it into this) and for fuzzing the converters.

use super::{FinishInfo, Target};
use std::io;

#[derive(Debug, Default)]
pub struct DiscardTarget {
    /// Bytes of data handed over (zero runs excluded).
    pub written: u64,
}

impl Target for DiscardTarget {
    fn write_at(&mut self, _offset: u64, buf: &[u8]) -> io::Result<()> {
        self.written += buf.len() as u64;
        Ok(())
    }
    fn zero(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn checkpoint(&mut self, _upto: u64) -> io::Result<()> {
        Ok(())
    }
    fn finish(&mut self, _final_len: u64) -> io::Result<FinishInfo> {
        Ok(FinishInfo::default())
    }
    fn abort(&mut self) {}
    fn prepare_random(&mut self, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn path(&self) -> &std::path::Path {
        std::path::Path::new("<memory>")
    }
}
