//! xz decoding on every core the pod may use.
//!
//! `xz -T`, pixz and most image builders write multi-block streams whose block headers
//! carry their sizes; liblzma's threaded decoder hands such blocks to worker threads and
//! gives the output back in order. A single-block stream (plain `xz` without `-T`) has
//! nothing to split and liblzma decodes it serially, as before.
//!
//! Threads: [`std::thread::available_parallelism`], which honours the cgroup CPU quota
//! (a 750m pod gets one thread, so the serial decoder). Memory: liblzma drops to serial
//! decoding for any block that would take the threaded decoder over
//! [`threading_memory`]: a fixed cap, lowered to an eighth of the cgroup's memory limit.
//!
//! Concatenated streams (and the zero stream padding between them) are followed here
//! rather than by liblzma, whose threaded decoder cannot be given `LZMA_CONCATENATED`
//! through the Rust binding.

use liblzma::stream::{Action, MtStreamBuilder, Status, Stream};
use std::io::{self, BufRead, Read};

/// What the threaded decoder may use before it falls back to one thread for a block.
const THREADING_MEMORY_CAP: u64 = 96 << 20;

/// The memory the threaded decoder may use: [`THREADING_MEMORY_CAP`], or an eighth of
/// the cgroup's memory limit when that is smaller (but at least 16 MiB).
pub fn threading_memory() -> u64 {
    cgroup_memory_limit().map_or(THREADING_MEMORY_CAP, |l| {
        (l / 8).clamp(16 << 20, THREADING_MEMORY_CAP)
    })
}

/// A decoder for concatenated xz streams, threaded when `threads > 1`.
pub struct XzReader<R> {
    inner: R,
    /// `None` between streams, where only padding or another stream may follow.
    stream: Option<Stream>,
    threads: u32,
    /// [`threading_memory`], read once (it reads the cgroup's files).
    memlimit: u64,
    padding: u64,
}

impl<R: BufRead> XzReader<R> {
    /// Decodes with as many threads as the pod may use.
    pub fn new(inner: R) -> io::Result<Self> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_threads(inner, u32::try_from(threads).unwrap_or(1))
    }

    pub fn with_threads(inner: R, threads: u32) -> io::Result<Self> {
        let mut r = XzReader {
            inner,
            stream: None,
            threads: threads.max(1),
            memlimit: if threads > 1 { threading_memory() } else { 0 },
            padding: 0,
        };
        r.stream = Some(r.decoder()?);
        Ok(r)
    }

    fn decoder(&self) -> io::Result<Stream> {
        let s = if self.threads > 1 {
            MtStreamBuilder::new()
                .threads(self.threads)
                .memlimit_threading(self.memlimit)
                .memlimit_stop(u64::MAX)
                .timeout_ms(0)
                .decoder()
        } else {
            Stream::new_stream_decoder(u64::MAX, 0)
        };
        s.map_err(|e| io::Error::other(format!("xz decoder: {e}")))
    }

    /// Between streams: skips zero padding; `Ok(false)` at the end of the input.
    fn next_stream(&mut self) -> io::Result<bool> {
        loop {
            let input = self.inner.fill_buf()?;
            if input.is_empty() {
                return if self.padding.is_multiple_of(4) {
                    Ok(false)
                } else {
                    Err(bad("xz stream padding is not a multiple of four bytes"))
                };
            }
            let zeros = input.iter().take_while(|&&b| b == 0).count();
            let more = zeros < input.len();
            self.inner.consume(zeros);
            self.padding += zeros as u64;
            if more {
                if !self.padding.is_multiple_of(4) {
                    return Err(bad("xz stream padding is not a multiple of four bytes"));
                }
                self.padding = 0;
                self.stream = Some(self.decoder()?);
                return Ok(true);
            }
        }
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

impl<R: BufRead> Read for XzReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.stream.is_none() && !self.next_stream()? {
                return Ok(0);
            }
            let Some(stream) = self.stream.as_mut() else {
                return Ok(0);
            };
            let input = self.inner.fill_buf()?;
            let eof = input.is_empty();
            let (in0, out0) = (stream.total_in(), stream.total_out());
            let status = stream
                .process(input, buf, if eof { Action::Finish } else { Action::Run })
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let consumed = usize::try_from(stream.total_in() - in0).unwrap_or(usize::MAX);
            let read = usize::try_from(stream.total_out() - out0).unwrap_or(usize::MAX);
            self.inner.consume(consumed);
            if status == Status::StreamEnd {
                self.stream = None;
            }
            if read > 0 {
                return Ok(read);
            }
            if self.stream.is_none() {
                continue;
            }
            if eof {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "xz stream is truncated",
                ));
            }
            if consumed == 0 && status == Status::MemNeeded {
                return Err(bad("xz stream is corrupt: the decoder made no progress"));
            }
        }
    }
}

/// The memory limit of this process's cgroup (v2 `memory.max`, v1
/// `memory.limit_in_bytes`), if there is one.
pub fn cgroup_memory_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut candidates = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrl), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if ctrl.is_empty() {
            candidates.push(format!("/sys/fs/cgroup{path}/memory.max"));
        } else if ctrl.split(',').any(|c| c == "memory") {
            candidates.push(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"));
        }
    }
    candidates.push("/sys/fs/cgroup/memory.max".into());
    candidates.push("/sys/fs/cgroup/memory/memory.limit_in_bytes".into());
    candidates
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|s| s.trim().parse::<u64>().ok())
        // v1 reports "no limit" as a huge page-aligned number.
        .find(|&l| l < 1 << 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use liblzma::stream::Check;
    use std::io::{BufReader, Write};

    fn multi_block(data: &[u8], threads: u32) -> Vec<u8> {
        let stream = MtStreamBuilder::new()
            .threads(threads)
            .block_size(64 << 10)
            .preset(1)
            .check(Check::Crc64)
            .encoder()
            .expect("encoder");
        let mut e = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
        e.write_all(data).expect("write");
        e.finish().expect("finish")
    }

    fn decode(xz: &[u8], threads: u32) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        XzReader::with_threads(BufReader::with_capacity(4096, xz), threads)?
            .read_to_end(&mut out)?;
        Ok(out)
    }

    fn data() -> Vec<u8> {
        (0..1_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 & 0x3f)
            .collect()
    }

    #[test]
    fn multi_block_concatenated_and_padded() {
        let d = data();
        let mut xz = multi_block(&d, 2);
        xz.extend([0u8; 8]);
        xz.extend(multi_block(b"tail", 1));
        xz.extend([0u8; 4]);
        for threads in [1, 2, 4] {
            let mut want = d.clone();
            want.extend(b"tail");
            assert_eq!(decode(&xz, threads).expect("decode"), want, "{threads}");
        }
    }

    #[test]
    fn bad_padding_truncation_and_corruption_are_errors() {
        let d = data();
        let mut xz = multi_block(&d, 2);
        xz.extend([0u8; 3]);
        assert!(decode(&xz, 2).is_err(), "padding of three");

        let whole = multi_block(&d, 2);
        for threads in [1, 2] {
            let err = decode(&whole[..whole.len() / 2], threads).expect_err("truncated");
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
            let mut bent = whole.clone();
            let mid = bent.len() / 2;
            bent[mid] ^= 0x55;
            assert!(decode(&bent, threads).is_err(), "corrupt, {threads}");
        }
        let mut junk = whole;
        junk.extend(b"junk");
        assert!(decode(&junk, 2).is_err(), "trailing junk");
    }
}
