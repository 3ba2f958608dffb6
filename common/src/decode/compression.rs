//! Streaming decompressors. Every one accepts concatenated streams/members (pigz, pbzip2
//! and pzstd write those) and any window or dictionary size: the memory a stream asks
//! for is bounded by the format (xz 1.5 GiB dictionary at most, zstd 2 GiB window), and
//! refusing valid streams is a worse failure than using it (CDI's xz reader does).

use super::gzip::{GzipReader, Integrity};
use crate::sniff::Format;
use std::io::{self, Read};

/// Wraps `r` in the decoder for `format`; `None` if `format` is not a compression.
/// `integrity` says whether a digest already covers `r` (gzip then skips its CRC).
pub fn decompressor<'a, R: Read + 'a>(
    format: Format,
    r: R,
    integrity: Integrity,
) -> io::Result<Option<Box<dyn Read + 'a>>> {
    Ok(Some(match format {
        Format::Gzip => Box::new(GzipReader::new(r, integrity)),
        Format::Xz => Box::new(super::xz::XzReader::new(io::BufReader::with_capacity(
            1 << 20,
            r,
        ))?),
        Format::Zstd => {
            let mut d = zstd::stream::read::Decoder::new(r)?;
            d.window_log_max(31)?;
            Box::new(d)
        }
        Format::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(r)),
        _ => return Ok(None),
    }))
}

/// The decompressed size a zstd frame header declares, if it declares one. Used only to
/// refuse an obviously too-large image before writing; the stream is still capped.
pub fn zstd_declared_size(head: &[u8]) -> Option<u64> {
    zstd::zstd_safe::get_frame_content_size(head).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn roundtrip(format: Format, compressed: &[u8], expect: &[u8]) {
        let mut d = decompressor(format, compressed, Integrity::Crc)
            .expect("init")
            .expect("is compression");
        let mut out = Vec::new();
        d.read_to_end(&mut out).expect("decode");
        assert_eq!(out, expect, "{format}");
    }

    #[test]
    fn multi_member_gzip() {
        let mut all = Vec::new();
        for part in [&b"hello "[..], &b"world"[..]] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part).expect("write");
            all.extend(e.finish().expect("finish"));
        }
        roundtrip(Format::Gzip, &all, b"hello world");
    }

    #[test]
    fn concatenated_zstd_and_xz_and_bzip2() {
        let mut z = zstd::encode_all(&b"ab"[..], 3).expect("zstd");
        z.extend(zstd::encode_all(&b"cd"[..], 3).expect("zstd"));
        roundtrip(Format::Zstd, &z, b"abcd");
        assert_eq!(
            zstd_declared_size(&zstd::bulk::compress(b"ab", 3).expect("bulk")),
            Some(2)
        );

        let mut x = Vec::new();
        for part in [&b"ab"[..], &b"cd"[..]] {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
            e.write_all(part).expect("write");
            x.extend(e.finish().expect("finish"));
        }
        roundtrip(Format::Xz, &x, b"abcd");

        let mut b = Vec::new();
        for part in [&b"ab"[..], &b"cd"[..]] {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            e.write_all(part).expect("write");
            b.extend(e.finish().expect("finish"));
        }
        roundtrip(Format::Bzip2, &b, b"abcd");
    }

    #[test]
    fn corrupt_gzip_is_an_error() {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&[7u8; 100_000]).expect("write");
        let mut gz = e.finish().expect("finish");
        let mid = gz.len() / 2;
        gz[mid] ^= 0xff;
        gz.truncate(gz.len() - 4);
        let mut d = decompressor(Format::Gzip, &gz[..], Integrity::Crc)
            .expect("init")
            .expect("some");
        assert!(d.read_to_end(&mut Vec::new()).is_err());
    }
}
