//! Reading an image by host offset from a stream that only goes forward.
//!
//! Table-driven formats (vmdk, vhd, vdi, vhdx) say where each block of guest data sits
//! in the file. Converters read the header and tables first, then every data extent in
//! ascending host order, so a well-ordered image (tables before data, as every tool
//! writes them) streams with no buffering at all. While tables are still being read,
//! everything the stream passes over is retained (memory, then scratch, see [`Held`]):
//! an image that stores data before a table can still be converted, and the cost is
//! paid only by such images.

use super::held::Held;
use crate::format::contract::{FormatError, StreamOptions};
use crate::sniff::Format;
use std::io::{self, Read};

/// Retained bytes are kept in aligned chunks of this size, keyed by their start.
pub const CHUNK: u64 = 64 << 10;

pub struct HostReader<'r> {
    r: &'r mut dyn Read,
    format: Format,
    pos: u64,
    /// While tables are read: what has been passed over, in chunks.
    held: Option<Held>,
    /// The chunk being filled, and where it starts (a multiple of [`CHUNK`]: retention
    /// runs from byte 0 without gaps).
    partial: Vec<u8>,
    partial_start: u64,
    retaining: bool,
    scratch_buf: Vec<u8>,
}

impl<'r> HostReader<'r> {
    /// `held` retains what is skipped until [`HostReader::stop_retaining`].
    pub fn new(r: &'r mut dyn Read, format: Format, held: Held) -> Self {
        HostReader {
            r,
            format,
            pos: 0,
            held: Some(held),
            partial: Vec::new(),
            partial_start: 0,
            retaining: true,
            scratch_buf: Vec::new(),
        }
    }

    /// A reader for one converter: retention as `opts` allow (memory then scratch, or
    /// re-reading the source file).
    pub fn for_image(r: &'r mut dyn Read, format: Format, opts: &StreamOptions) -> Self {
        HostReader::new(r, format, opts.held(format.name(), CHUNK))
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Host offset of the next byte the stream will give.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// Every table is known: from now on, bytes passed over are dropped. What was
    /// retained stays readable.
    pub fn stop_retaining(&mut self) -> Result<(), FormatError> {
        if self.retaining {
            self.flush_partial()?;
            self.retaining = false;
        }
        Ok(())
    }

    /// Fills `buf` with the bytes at host offset `off`.
    pub fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<(), FormatError> {
        if buf.is_empty() {
            return Ok(());
        }
        if off < self.pos {
            let split = ((self.pos - off) as usize).min(buf.len());
            let (behind, ahead) = buf.split_at_mut(split);
            self.read_retained(off, behind)?;
            return self.read_at(off + split as u64, ahead);
        }
        self.skip_to(off)?;
        self.fill(buf)
    }

    /// Reads the first bytes of the image into `buf`, fewer if the image is shorter.
    pub fn read_prefix(&mut self, buf: &mut [u8]) -> Result<usize, FormatError> {
        debug_assert_eq!(self.pos, 0);
        let n = crate::stream::read_full(self.r, buf).map_err(|e| self.read_error(e))?;
        self.pos = n as u64;
        if self.retaining {
            self.retain(0, &buf[..n])?;
        }
        Ok(n)
    }

    /// Skips forward to `off` (retaining while tables are read).
    pub fn skip_to(&mut self, off: u64) -> Result<(), FormatError> {
        let mut buf = std::mem::take(&mut self.scratch_buf);
        buf.resize(CHUNK as usize, 0);
        let mut result = Ok(());
        while self.pos < off {
            let n = ((off - self.pos).min(CHUNK)) as usize;
            if let Err(e) = self.fill(&mut buf[..n]) {
                result = Err(e);
                break;
            }
        }
        self.scratch_buf = buf;
        result
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), FormatError> {
        let n = crate::stream::read_full(self.r, buf).map_err(|e| self.read_error(e))?;
        let start = self.pos;
        self.pos += n as u64;
        if n < buf.len() {
            return Err(FormatError::Truncated {
                format: self.format,
                end: self.pos,
                offset: start + buf.len() as u64 - 1,
            });
        }
        if self.retaining {
            self.retain(start, buf)?;
        }
        Ok(())
    }

    fn retain(&mut self, mut at: u64, mut data: &[u8]) -> Result<(), FormatError> {
        while !data.is_empty() {
            let in_chunk = (CHUNK - at % CHUNK) as usize;
            let n = in_chunk.min(data.len());
            self.partial.extend_from_slice(&data[..n]);
            at += n as u64;
            data = &data[n..];
            if at.is_multiple_of(CHUNK) {
                self.flush_partial()?;
            }
        }
        Ok(())
    }

    fn flush_partial(&mut self) -> Result<(), FormatError> {
        if self.partial.is_empty() {
            return Ok(());
        }
        let format = self.format;
        if let Some(h) = &mut self.held {
            h.put(self.partial_start, &self.partial)
                .map_err(|source| FormatError::Held { format, source })?;
        }
        self.partial_start += self.partial.len() as u64;
        self.partial.clear();
        Ok(())
    }

    fn read_retained(&mut self, mut off: u64, mut buf: &mut [u8]) -> Result<(), FormatError> {
        let format = self.format;
        while !buf.is_empty() {
            let chunk = off / CHUNK * CHUNK;
            let within = (off - chunk) as usize;
            let data = match &self.held {
                Some(h) => h
                    .get(chunk)
                    .map_err(|source| FormatError::Held { format, source })?,
                None => None,
            };
            let data = data
                .or_else(|| {
                    (self.partial_start == chunk && !self.partial.is_empty())
                        .then(|| self.partial.clone())
                })
                .filter(|d| d.len() > within)
                .ok_or(FormatError::Behind {
                    format,
                    offset: off,
                })?;
            let n = (data.len() - within).min(buf.len());
            buf[..n].copy_from_slice(&data[within..within + n]);
            off += n as u64;
            buf = &mut buf[n..];
        }
        Ok(())
    }

    fn read_error(&self, e: io::Error) -> FormatError {
        FormatError::Read {
            format: self.format,
            source: e,
        }
    }
}

/// A run of guest data stored contiguously in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub host: u64,
    pub guest: u64,
    pub len: u64,
}

/// Separate runs a table-driven image may have: 24 MiB of [`Extent`]s. A real image
/// reaches it only when over a million blocks were allocated out of guest order.
pub const MAX_EXTENTS: usize = 1 << 20;

/// Adds `e`, merged into the previous run when both its host and guest offsets continue
/// it. Tools allocate blocks in write order, so a disk written front to back collapses
/// to a few runs, and the list stays small however large the disk. Beyond
/// [`MAX_EXTENTS`] runs the image is refused rather than grow memory.
pub fn push_extent(format: Format, list: &mut Vec<Extent>, e: Extent) -> Result<(), FormatError> {
    if let Some(last) = list.last_mut() {
        if last.host.checked_add(last.len) == Some(e.host)
            && last.guest.checked_add(last.len) == Some(e.guest)
        {
            last.len += e.len;
            return Ok(());
        }
    }
    if list.len() >= MAX_EXTENTS {
        return Err(FormatError::unsupported(
            format,
            format!("more than {MAX_EXTENTS} separate block runs (a fragmented image: convert it with qemu-img first)"),
        ));
    }
    list.push(e);
    Ok(())
}

/// Refuses a block table (vmdk grain directory, vhd BAT, vdi block map) of more than
/// `max` bytes before anything is allocated from its length. Each format's bound is far
/// above what a real image of the largest size the format allows needs.
pub fn check_table(format: Format, what: &str, bytes: u64, max: u64) -> Result<(), FormatError> {
    if bytes > max {
        return Err(FormatError::unsupported(
            format,
            format!("a {what} of {bytes} bytes (more than {max})"),
        ));
    }
    Ok(())
}

/// Copies `extents` to their guest offsets, reading them in host order (tables must
/// have been read and retention stopped). Two extents sharing host bytes are refused:
/// no tool writes that, and a stream could not give the bytes twice.
pub fn copy_extents(
    rd: &mut HostReader<'_>,
    writer: &mut crate::sink::SparseWriter,
    mut extents: Vec<Extent>,
) -> Result<(), FormatError> {
    extents.sort_unstable_by_key(|e| e.host);
    let mut buf = vec![0u8; 1 << 20];
    let mut end = 0u64;
    for e in extents {
        if e.host < end {
            return Err(FormatError::corrupt(
                rd.format(),
                format!("two blocks share the bytes at offset {}", e.host),
            ));
        }
        let mut done = 0u64;
        while done < e.len {
            let n = (e.len - done).min(buf.len() as u64) as usize;
            rd.read_at(e.host + done, &mut buf[..n])?;
            writer.write_at(e.guest + done, &buf[..n])?;
            done += n as u64;
        }
        end = e.host + e.len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(mem: u64) -> Held {
        Held::new("test", mem, None, CHUNK)
    }

    fn data() -> Vec<u8> {
        (0..600_000u32).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn reads_forward_and_back_into_what_was_retained() {
        let d = data();
        let mut src = &d[..];
        let mut rd = HostReader::new(&mut src, Format::Vdi, held(1 << 20));
        let mut b = [0u8; 10];
        rd.read_at(300_000, &mut b).expect("forward");
        assert_eq!(&b[..], &d[300_000..300_010]);
        rd.stop_retaining().expect("stop");
        let mut back = vec![0u8; 200_000];
        rd.read_at(100_000, &mut back).expect("retained");
        assert_eq!(back, &d[100_000..300_000]);
        // Spanning retained bytes and the stream ahead.
        let mut span = vec![0u8; 20_000];
        rd.read_at(295_000, &mut span).expect("span");
        assert_eq!(span, &d[295_000..315_000]);
        // Past what was retained (retention stopped at 300_010).
        rd.read_at(400_000, &mut b).expect("forward");
        let err = rd.read_at(350_000, &mut b).expect_err("not retained");
        assert!(matches!(err, FormatError::Behind { .. }), "{err}");
    }

    #[test]
    fn retention_beyond_memory_needs_scratch() {
        let d = data();
        let mut src = &d[..];
        let mut rd = HostReader::new(&mut src, Format::Vmdk, held(100_000));
        let mut b = [0u8; 1];
        let err = rd.read_at(500_000, &mut b).expect_err("no scratch");
        assert!(
            matches!(
                err,
                FormatError::Held {
                    source: crate::format::forward::held::HeldError::ScratchRequired { .. },
                    ..
                }
            ),
            "{err}"
        );
        let dir = tempfile::tempdir().expect("tmp");
        let mut src = &d[..];
        let mut rd = HostReader::new(
            &mut src,
            Format::Vmdk,
            Held::new("test", 100_000, Some(dir.path().into()), CHUNK),
        );
        rd.read_at(500_000, &mut b).expect("spooled");
        rd.stop_retaining().expect("stop");
        let mut back = vec![0u8; 400_000];
        rd.read_at(1, &mut back).expect("from spool");
        assert_eq!(back, &d[1..400_001]);
    }

    #[test]
    fn contiguous_extents_merge_and_big_tables_are_refused() {
        let mut v = Vec::new();
        for i in 0..1000u64 {
            push_extent(
                Format::Raw,
                &mut v,
                Extent {
                    host: 4096 + i * 512,
                    guest: i * 512,
                    len: 512,
                },
            )
            .expect("push");
        }
        push_extent(
            Format::Raw,
            &mut v,
            Extent {
                host: 1 << 30,
                guest: 1 << 20,
                len: 512,
            },
        )
        .expect("push");
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].len, 512_000);
        assert!(check_table(Format::Vmdk, "grain directory", 5 << 20, 4 << 20).is_err());
        assert!(check_table(Format::Vmdk, "grain directory", 4 << 20, 4 << 20).is_ok());
    }

    #[test]
    fn truncation_is_reported_with_offsets() {
        let d = vec![1u8; 1000];
        let mut src = &d[..];
        let mut rd = HostReader::new(&mut src, Format::Vpc, held(1 << 20));
        let mut b = [0u8; 100];
        let err = rd.read_at(950, &mut b).expect_err("short");
        assert!(
            matches!(err, FormatError::Truncated { end: 1000, .. }),
            "{err}"
        );
    }
}
