//! gzip (RFC 1952), every member of a multi-member stream (pigz, concatenated files),
//! inflated by flate2's raw deflate decoder over a large input buffer.
//!
//! Our own framing instead of flate2's `MultiGzDecoder` for one reason: the CRC-32 of
//! every output byte is optional. When a digest already covers the compressed bytes (a
//! registry layer or an artifact blob, checked at its end by the source), a mismatch
//! could only come from the image's author, who chose the bytes anyway; the CRC pass
//! costs a tenth of a registry import's CPU, so it is skipped there
//! ([`Integrity::Digest`]). ISIZE, the member's length modulo 2^32, is always checked.
//!
//! The header is read field by field with nothing kept: a name or comment of any length
//! costs no memory. Reserved flag bits, a method other than deflate, a bad header CRC
//! (FHCRC) and anything after the last member that is not another member are errors, as
//! in gzip(1) and flate2.

use flate2::{Crc, Decompress, FlushDecompress, Status};
use std::io::{self, BufRead, BufReader, Read};

/// Input buffered per read from the source: large, so that inflate runs on long runs.
const INPUT: usize = 256 << 10;

/// What vouches for the compressed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    /// Nothing else: every member's CRC-32 is checked.
    Crc,
    /// A digest of the compressed stream, checked by the source when it ends.
    Digest,
}

const FHCRC: u8 = 2;
const FEXTRA: u8 = 4;
const FNAME: u8 = 8;
const FCOMMENT: u8 = 16;
const RESERVED: u8 = 0xe0;

#[derive(Clone, Copy)]
enum State {
    /// Before a member's header; `first` until one member has been read.
    Header {
        first: bool,
    },
    Body,
    Done,
}

pub struct GzipReader<R: Read> {
    input: BufReader<R>,
    inflate: Decompress,
    state: State,
    /// The running CRC of this member's output, when checked.
    crc: Option<Crc>,
    /// This member's output length (ISIZE holds it modulo 2^32).
    len: u64,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn short(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the gzip stream ends inside {what}"),
    )
}

/// `buf.len()` bytes of `r`, added to the header CRC.
fn read_exact(r: &mut impl BufRead, buf: &mut [u8], hcrc: &mut Crc, what: &str) -> io::Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            short(what)
        } else {
            e
        }
    })?;
    hcrc.update(buf);
    Ok(())
}

/// Skips `n` bytes of `r`, adding them to the header CRC.
fn skip(r: &mut impl BufRead, mut n: u64, hcrc: &mut Crc, what: &str) -> io::Result<()> {
    while n > 0 {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            return Err(short(what));
        }
        let k = avail.len().min(usize::try_from(n).unwrap_or(usize::MAX));
        hcrc.update(&avail[..k]);
        r.consume(k);
        n -= k as u64;
    }
    Ok(())
}

/// Skips a zero-terminated field (the terminator included), adding it to the header CRC.
fn skip_zero_terminated(r: &mut impl BufRead, hcrc: &mut Crc, what: &str) -> io::Result<()> {
    loop {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            return Err(short(what));
        }
        let (k, done) = match avail.iter().position(|&b| b == 0) {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        hcrc.update(&avail[..k]);
        r.consume(k);
        if done {
            return Ok(());
        }
    }
}

impl<R: Read> GzipReader<R> {
    pub fn new(r: R, integrity: Integrity) -> Self {
        GzipReader {
            input: BufReader::with_capacity(INPUT, r),
            inflate: Decompress::new(false),
            state: State::Header { first: true },
            crc: (integrity == Integrity::Crc).then(Crc::new),
            len: 0,
        }
    }

    /// Reads a member header; `Ok(false)` at a clean end of input after a member.
    fn header(&mut self, first: bool) -> io::Result<bool> {
        let input = &mut self.input;
        if !first && input.fill_buf()?.is_empty() {
            return Ok(false);
        }
        let mut hcrc = Crc::new();
        let mut fixed = [0u8; 10];
        read_exact(input, &mut fixed[..2], &mut hcrc, "a member header")?;
        if fixed[0..2] != [0x1f, 0x8b] {
            return Err(invalid(if first {
                "not a gzip stream"
            } else {
                "data after the last gzip member is not another member"
            }));
        }
        read_exact(input, &mut fixed[2..], &mut hcrc, "a member header")?;
        if fixed[2] != 8 {
            return Err(invalid(format!(
                "gzip compression method {} (only 8, deflate, exists)",
                fixed[2]
            )));
        }
        let flags = fixed[3];
        if flags & RESERVED != 0 {
            return Err(invalid(format!(
                "gzip header flags {flags:#04x} set reserved bits"
            )));
        }
        if flags & FEXTRA != 0 {
            let mut xlen = [0u8; 2];
            read_exact(input, &mut xlen, &mut hcrc, "the header's extra field")?;
            let n = u64::from(u16::from_le_bytes(xlen));
            skip(input, n, &mut hcrc, "the header's extra field")?;
        }
        for (flag, what) in [(FNAME, "the file name"), (FCOMMENT, "the comment")] {
            if flags & flag != 0 {
                skip_zero_terminated(input, &mut hcrc, what)?;
            }
        }
        if flags & FHCRC != 0 {
            let want = hcrc.sum() & 0xffff;
            let mut got = [0u8; 2];
            read_exact(input, &mut got, &mut Crc::new(), "the header CRC")?;
            if u32::from(u16::from_le_bytes(got)) != want {
                return Err(invalid("the gzip header CRC does not match the header"));
            }
        }
        Ok(true)
    }

    /// Reads and checks a member's trailer (CRC-32 when kept, ISIZE always).
    fn trailer(&mut self) -> io::Result<()> {
        let mut t = [0u8; 8];
        read_exact(&mut self.input, &mut t, &mut Crc::new(), "a member trailer")?;
        let crc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        let isize = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
        if let Some(c) = &self.crc {
            if c.sum() != crc {
                return Err(invalid(format!(
                    "gzip CRC-32 mismatch: the member says {crc:08x}, its data is {:08x}",
                    c.sum()
                )));
            }
        }
        // ISIZE is the length modulo 2^32: the truncation is the format's.
        if isize != self.len as u32 {
            return Err(invalid(format!(
                "gzip length mismatch: the member says {isize} (mod 2^32), its data is {} bytes",
                self.len
            )));
        }
        Ok(())
    }

    /// Inflates into `buf`; `Ok(0)` when the member's deflate stream ended.
    fn body(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let avail = self.input.fill_buf()?;
            let eof = avail.is_empty();
            let (in0, out0) = (self.inflate.total_in(), self.inflate.total_out());
            let status = self
                .inflate
                .decompress(avail, buf, FlushDecompress::None)
                .map_err(|e| invalid(format!("corrupt deflate data: {e}")))?;
            let used = (self.inflate.total_in() - in0) as usize;
            let made = (self.inflate.total_out() - out0) as usize;
            self.input.consume(used);
            if made > 0 {
                return Ok(made);
            }
            match status {
                Status::StreamEnd => return Ok(0),
                _ if used == 0 && eof => return Err(short("deflate data")),
                _ => {}
            }
        }
    }
}

impl<R: Read> Read for GzipReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                State::Done => return Ok(0),
                State::Header { first } => {
                    if !self.header(first)? {
                        self.state = State::Done;
                        return Ok(0);
                    }
                    self.inflate.reset(false);
                    if let Some(c) = &mut self.crc {
                        c.reset();
                    }
                    self.len = 0;
                    self.state = State::Body;
                }
                State::Body => {
                    let n = self.body(buf)?;
                    if n > 0 {
                        if let Some(c) = &mut self.crc {
                            c.update(&buf[..n]);
                        }
                        self.len += n as u64;
                        return Ok(n);
                    }
                    self.trailer()?;
                    self.state = State::Header { first: false };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).expect("write");
        e.finish().expect("finish")
    }

    fn inflate(data: &[u8], integrity: Integrity) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        GzipReader::new(data, integrity).read_to_end(&mut out)?;
        Ok(out)
    }

    fn both(data: &[u8]) -> [io::Result<Vec<u8>>; 2] {
        [
            inflate(data, Integrity::Crc),
            inflate(data, Integrity::Digest),
        ]
    }

    #[test]
    fn members_are_followed_and_match_flate2() {
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 / 3) as u8).collect();
        let mut all = gz(&big);
        all.extend(gz(b""));
        all.extend(gz(b"tail"));
        let mut want = Vec::new();
        flate2::read::MultiGzDecoder::new(&all[..])
            .read_to_end(&mut want)
            .expect("flate2");
        for got in both(&all) {
            assert_eq!(got.expect("inflate"), want);
        }
    }

    #[test]
    fn header_fields_are_skipped_and_the_header_crc_checked() {
        let body = gz(b"hello");
        // FEXTRA + FNAME + FCOMMENT + FHCRC around the same deflate data and trailer.
        let mut h = vec![
            0x1f,
            0x8b,
            8,
            FEXTRA | FNAME | FCOMMENT | FHCRC,
            0,
            0,
            0,
            0,
            0,
            3,
        ];
        h.extend([3, 0, b'a', b'b', b'c']);
        h.extend(b"disk.img\0");
        h.extend(b"a comment\0");
        let mut c = Crc::new();
        c.update(&h);
        let hcrc = (c.sum() & 0xffff) as u16;
        let mut good = h.clone();
        good.extend(hcrc.to_le_bytes());
        good.extend(&body[10..]);
        for got in both(&good) {
            assert_eq!(got.expect("inflate"), b"hello");
        }
        let mut bad = h;
        bad.extend((hcrc ^ 1).to_le_bytes());
        bad.extend(&body[10..]);
        for got in both(&bad) {
            assert!(got
                .expect_err("bad header crc")
                .to_string()
                .contains("header CRC"));
        }
    }

    #[test]
    fn the_crc_is_checked_only_without_a_digest() {
        let mut z = gz(b"some data that will be checked");
        let n = z.len();
        z[n - 8] ^= 1; // the CRC-32 field
        let [crc, digest] = both(&z);
        assert!(crc
            .expect_err("crc")
            .to_string()
            .contains("CRC-32 mismatch"));
        assert_eq!(
            digest.expect("digest vouches"),
            b"some data that will be checked"
        );
        z[n - 8] ^= 1;
        z[n - 4] ^= 1; // ISIZE: always checked
        for got in both(&z) {
            assert!(got
                .expect_err("isize")
                .to_string()
                .contains("length mismatch"));
        }
    }

    #[test]
    fn truncation_junk_and_bad_headers_are_errors() {
        let z = gz(&[7u8; 100_000]);
        for cut in [3, 10, z.len() / 2, z.len() - 5] {
            for got in both(&z[..cut]) {
                let e = got.expect_err("truncated");
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "cut {cut}: {e}");
            }
        }
        let mut junk = z.clone();
        junk.extend(b"not gzip");
        for got in both(&junk) {
            assert!(got
                .expect_err("junk")
                .to_string()
                .contains("not another member"));
        }
        let mut method = z.clone();
        method[2] = 7;
        let mut reserved = z.clone();
        reserved[3] = 0x20;
        for bad in [method, reserved] {
            for got in both(&bad) {
                assert_eq!(got.expect_err("header").kind(), io::ErrorKind::InvalidData);
            }
        }
        let mut corrupt = z;
        corrupt[12] ^= 0xff;
        for got in both(&corrupt) {
            assert!(got.is_err());
        }
    }

    #[test]
    fn an_endless_file_name_costs_no_memory() {
        // 64 MiB of name with no terminator: read through, then "ends inside".
        let mut h = vec![0x1f, 0x8b, 8, FNAME, 0, 0, 0, 0, 0, 3];
        h.resize(64 << 20, b'n');
        let e = inflate(&h, Integrity::Crc).expect_err("no terminator");
        assert!(e.to_string().contains("file name"), "{e}");
    }
}
