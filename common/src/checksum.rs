//! `IMPORTER_CHECKSUM=algorithm:hex`, verified over the source bytes as they stream.

use sha2::digest::DynDigest;
use std::io::{self, Read};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ChecksumError {
    #[error(
        "invalid checksum {0:?}: expected algorithm:hexdigest with md5, sha1, sha256 or sha512"
    )]
    Invalid(String),
    #[error("checksum mismatch: expected {algorithm}:{expected}, got {algorithm}:{actual}")]
    Mismatch {
        algorithm: String,
        expected: String,
        actual: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Checksum {
    algorithm: String,
    expected: String,
}

impl Checksum {
    pub fn parse(s: &str) -> Result<Self, ChecksumError> {
        let invalid = || ChecksumError::Invalid(s.to_string());
        let (alg, hex_digest) = s.trim().split_once(':').ok_or_else(invalid)?;
        let alg = alg.to_ascii_lowercase();
        let len = match alg.as_str() {
            "md5" => 32,
            "sha1" => 40,
            "sha256" => 64,
            "sha512" => 128,
            _ => return Err(invalid()),
        };
        let expected = hex_digest.to_ascii_lowercase();
        if expected.len() != len || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        Ok(Checksum {
            algorithm: alg,
            expected,
        })
    }

    fn hasher(&self) -> Box<dyn DynDigest + Send> {
        match self.algorithm.as_str() {
            "md5" => Box::new(md5::Md5::default()),
            "sha1" => Box::new(sha1::Sha1::default()),
            "sha512" => Box::new(sha2::Sha512::default()),
            _ => Box::new(sha2::Sha256::default()),
        }
    }
}

/// Hashes everything read through it when a checksum is wanted (and passes bytes
/// through untouched when not); [`HashingReader::verify`] at the end.
pub struct HashingReader<R> {
    inner: R,
    check: Option<(Box<dyn DynDigest + Send>, Checksum)>,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R, want: Option<Checksum>) -> Self {
        HashingReader {
            inner,
            check: want.map(|w| (w.hasher(), w)),
        }
    }

    /// Call after the stream has been read to its end.
    pub fn verify(&mut self) -> Result<(), ChecksumError> {
        let Some((hasher, want)) = self.check.take() else {
            return Ok(());
        };
        let actual = hex::encode(hasher.finalize());
        if actual == want.expected {
            Ok(())
        } else {
            Err(ChecksumError::Mismatch {
                algorithm: want.algorithm,
                expected: want.expected,
                actual,
            })
        }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some((h, _)) = &mut self.check {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// A blob reader that checks its digest (`sha256:<hex>`) when it reaches the end, and
/// turns a mismatch into the read error that ends the stream: whoever reads a layer to
/// its end has verified it, with no step to forget.
pub struct DigestReader<R> {
    inner: HashingReader<R>,
    digest: String,
}

impl<R: Read> DigestReader<R> {
    pub fn new(inner: R, digest: &str) -> Result<Self, ChecksumError> {
        let want = Checksum::parse(digest)?;
        Ok(DigestReader {
            inner: HashingReader::new(inner, Some(want)),
            digest: digest.to_string(),
        })
    }
}

impl<R: Read> Read for DigestReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            if let Err(e) = self.inner.verify() {
                let msg = format!("blob {}: {e}", self.digest)
                    .replace("checksum mismatch", "digest mismatch");
                return Err(
                    crate::error::SourceError::new(crate::ErrorKind::CorruptImage, msg).into_io(),
                );
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_reader_fails_at_eof_on_mismatch() {
        let good = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let mut out = Vec::new();
        DigestReader::new(&b"abc"[..], good)
            .expect("digest")
            .read_to_end(&mut out)
            .expect("matches");
        let err = DigestReader::new(&b"abx"[..], good)
            .expect("digest")
            .read_to_end(&mut out)
            .expect_err("mismatch");
        assert!(err.to_string().contains("digest mismatch"), "{err}");
    }

    #[test]
    fn verifies_and_reports_mismatch() {
        let sha = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let mut r = HashingReader::new(&b"abc"[..], Some(Checksum::parse(sha).expect("parse")));
        std::io::copy(&mut r, &mut std::io::sink()).expect("read");
        r.verify().expect("match");
        let mut r = HashingReader::new(&b"abd"[..], Some(Checksum::parse(sha).expect("parse")));
        std::io::copy(&mut r, &mut std::io::sink()).expect("read");
        let e = r.verify().expect_err("mismatch");
        assert!(e.to_string().contains("checksum mismatch"));
        assert!(Checksum::parse("md5:xyz").is_err());
        assert!(Checksum::parse("crc32:00000000").is_err());
        assert!(Checksum::parse("MD5:900150983CD24FB0D6963F7D28E17F72").is_ok());
    }
}
