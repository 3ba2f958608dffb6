//! `IMPORTER_CHECKSUM=algorithm:hex`, verified over the source bytes as they stream.

use sha2::digest::DynDigest;
use std::io::{self, Read};

/// `sha256:<hex>` of a small blob: an OCI digest (manifests, configs).
pub fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// The digest of `data` in the algorithm `like` names (`sha256:...` or `sha512:...`),
/// to compare with `like`; `None` for another algorithm.
pub fn digest_of(like: &str, data: &[u8]) -> Option<String> {
    use sha2::Digest;
    match like.split_once(':')?.0 {
        "sha256" => Some(sha256_digest(data)),
        "sha512" => Some(format!(
            "sha512:{}",
            hex::encode(sha2::Sha512::digest(data))
        )),
        _ => None,
    }
}

/// Hashes everything read through it into a SHA-256 the caller keeps a handle on: a
/// report's digest of a stream whose reader is handed away (`importer inspect`).
pub struct Sha256Tap<R> {
    inner: R,
    hasher: std::sync::Arc<std::sync::Mutex<sha2::Sha256>>,
}

impl<R: Read> Sha256Tap<R> {
    pub fn new(inner: R, hasher: std::sync::Arc<std::sync::Mutex<sha2::Sha256>>) -> Self {
        Sha256Tap { inner, hasher }
    }
}

impl<R: Read> Read for Sha256Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Ok(mut h) = self.hasher.lock() {
            sha2::Digest::update(&mut *h, &buf[..n]);
        }
        Ok(n)
    }
}

/// `sha256:<hex>` of what a [`Sha256Tap`] has seen so far.
pub fn tap_digest(hasher: &std::sync::Mutex<sha2::Sha256>) -> String {
    let h = hasher.lock().map(|h| h.clone()).unwrap_or_default();
    format!("sha256:{}", hex::encode(sha2::Digest::finalize(h)))
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ChecksumError {
    #[error(
        "invalid checksum {0:?}: expected algorithm:hexdigest with md5, sha1, sha256 or sha512 (several separated by commas)"
    )]
    Invalid(String),
    #[error(
        "invalid Content-Digest {0:?}: expected sha-256=:base64: or sha-512=:base64: (RFC 9530)"
    )]
    InvalidContentDigest(String),
    #[error("a {0} digest came at the end of the upload, but {0} was not named in the checksum metadata when the upload was created")]
    NotHashed(String),
    #[error("two different {0} digests were given; give at most one per algorithm")]
    Conflicting(String),
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

/// A value quoted back in an error: at most 160 characters of it, so an oversized
/// header is not echoed whole into a response or a log line.
fn clip(s: &str) -> String {
    const SHOWN: usize = 160;
    if s.chars().count() <= SHOWN {
        return s.to_string();
    }
    let head: String = s.chars().take(SHOWN).collect();
    format!("{head}... ({} bytes)", s.len())
}

/// The digest length in hex digits of each algorithm we verify.
fn hex_len(alg: &str) -> Option<usize> {
    Some(match alg {
        "md5" => 32,
        "sha1" => 40,
        "sha256" => 64,
        "sha512" => 128,
        _ => return None,
    })
}

impl Checksum {
    pub fn parse(s: &str) -> Result<Self, ChecksumError> {
        let invalid = || ChecksumError::Invalid(clip(s));
        let (alg, hex_digest) = s.trim().split_once(':').ok_or_else(invalid)?;
        let alg = alg.trim().to_ascii_lowercase();
        let len = hex_len(&alg).ok_or_else(invalid)?;
        let expected = hex_digest.trim().to_ascii_lowercase();
        if expected.len() != len || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        Ok(Checksum {
            algorithm: alg,
            expected,
        })
    }

    /// `IMPORTER_CHECKSUM` (and an upload's `checksum`): one `algorithm:hex` as CDI takes,
    /// or several separated by commas, every one of which must match. Blank is none.
    pub fn parse_list(s: &str) -> Result<Vec<Self>, ChecksumError> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            out.push(Checksum::parse(part).map_err(|_| ChecksumError::Invalid(clip(s)))?);
        }
        Checksum::one_per_algorithm(out)
    }

    /// At most one digest per algorithm (so at most four hashers run, whatever a client
    /// sends): repeats of the same digest are dropped, two different digests of one
    /// algorithm are refused.
    pub fn one_per_algorithm(list: Vec<Self>) -> Result<Vec<Self>, ChecksumError> {
        let mut out: Vec<Self> = Vec::new();
        for c in list {
            match out.iter().find(|o| o.algorithm == c.algorithm) {
                Some(o) if *o == c => {}
                Some(_) => return Err(ChecksumError::Conflicting(c.algorithm)),
                None => out.push(c),
            }
        }
        Ok(out)
    }

    /// An RFC 9530 `Content-Digest` (or `Repr-Digest`) header:
    /// `sha-256=:<base64>:, sha-512=:<base64>:`. Algorithms this verifier does not know
    /// are ignored as the RFC allows, but a header naming none it knows is refused: the
    /// client asked for a verification that would otherwise silently not happen.
    pub fn parse_content_digest(s: &str) -> Result<Vec<Self>, ChecksumError> {
        use base64::Engine;
        let invalid = || ChecksumError::InvalidContentDigest(clip(s));
        let mut out = Vec::new();
        for member in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = member.split_once('=').ok_or_else(invalid)?;
            let alg = match key.trim().to_ascii_lowercase().as_str() {
                "sha-256" => "sha256",
                "sha-512" => "sha512",
                _ => continue,
            };
            let b64 = value
                .trim()
                .strip_prefix(':')
                .and_then(|v| v.strip_suffix(':'))
                .ok_or_else(invalid)?;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| invalid())?;
            if Some(raw.len() * 2) != hex_len(alg) {
                return Err(invalid());
            }
            out.push(Checksum {
                algorithm: alg.into(),
                expected: hex::encode(raw),
            });
        }
        if out.is_empty() {
            return Err(invalid());
        }
        Ok(out)
    }

    pub fn algorithm(&self) -> &str {
        &self.algorithm
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

impl std::fmt::Display for Checksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.expected)
    }
}

/// Hashers fed by hand, for bytes that do not pass through one reader (a resumable
/// upload's body arrives over many requests): one per algorithm, checked at the end
/// against digests that may only be known then.
pub struct Digests {
    hashers: Vec<(String, Box<dyn DynDigest + Send>)>,
}

impl Digests {
    /// Hashers for these algorithms (names as [`Checksum::parse`] takes them; unknown
    /// ones are refused, repeats hashed once).
    pub fn new<'a>(algorithms: impl IntoIterator<Item = &'a str>) -> Result<Self, ChecksumError> {
        let mut hashers: Vec<(String, Box<dyn DynDigest + Send>)> = Vec::new();
        for alg in algorithms {
            let alg = alg.trim().to_ascii_lowercase();
            if hex_len(&alg).is_none() {
                return Err(ChecksumError::Invalid(clip(&alg)));
            }
            if hashers.iter().all(|(a, _)| *a != alg) {
                let probe = Checksum {
                    algorithm: alg.clone(),
                    expected: String::new(),
                };
                hashers.push((alg, probe.hasher()));
            }
        }
        Ok(Digests { hashers })
    }

    /// Hashers for the algorithms of these (parsed) digests.
    pub fn for_checksums(wants: &[Checksum]) -> Self {
        let mut hashers: Vec<(String, Box<dyn DynDigest + Send>)> = Vec::new();
        for w in wants {
            if hashers.iter().all(|(a, _)| *a != w.algorithm) {
                hashers.push((w.algorithm.clone(), w.hasher()));
            }
        }
        Digests { hashers }
    }

    pub fn update(&mut self, data: &[u8]) {
        for (_, h) in &mut self.hashers {
            h.update(data);
        }
    }

    /// Every wanted digest against its hasher; one that no hasher ran for is refused.
    pub fn check(self, wants: &[Checksum]) -> Result<(), ChecksumError> {
        let mut done: Vec<(String, String)> = self
            .hashers
            .into_iter()
            .map(|(a, h)| (a, hex::encode(h.finalize())))
            .collect();
        for want in wants {
            let Some((_, actual)) = done.iter_mut().find(|(a, _)| *a == want.algorithm) else {
                return Err(ChecksumError::NotHashed(want.algorithm.clone()));
            };
            if *actual != want.expected {
                return Err(ChecksumError::Mismatch {
                    algorithm: want.algorithm.clone(),
                    expected: want.expected.clone(),
                    actual: std::mem::take(actual),
                });
            }
        }
        Ok(())
    }
}

/// Hashes everything read through it with every wanted checksum (one pass over the
/// bytes, each hasher fed the same buffer; nothing when none is wanted);
/// [`HashingReader::verify`] at the end.
pub struct HashingReader<R> {
    inner: R,
    /// Taken by the first [`HashingReader::verify`].
    digests: Option<Digests>,
    wants: Vec<Checksum>,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R, wants: Vec<Checksum>) -> Self {
        HashingReader {
            inner,
            digests: Some(Digests::for_checksums(&wants)),
            wants,
        }
    }

    /// Call after the stream has been read to its end. The first mismatch is the error.
    pub fn verify(&mut self) -> Result<(), ChecksumError> {
        match self.digests.take() {
            Some(d) => d.check(&self.wants),
            None => Ok(()),
        }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(d) = &mut self.digests {
            d.update(&buf[..n]);
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
            inner: HashingReader::new(inner, vec![want]),
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
        let mut r = HashingReader::new(&b"abc"[..], vec![Checksum::parse(sha).expect("parse")]);
        std::io::copy(&mut r, &mut std::io::sink()).expect("read");
        r.verify().expect("match");
        let mut r = HashingReader::new(&b"abd"[..], vec![Checksum::parse(sha).expect("parse")]);
        std::io::copy(&mut r, &mut std::io::sink()).expect("read");
        let e = r.verify().expect_err("mismatch");
        assert!(e.to_string().contains("checksum mismatch"));
        assert!(Checksum::parse("md5:xyz").is_err());
        assert!(Checksum::parse("crc32:00000000").is_err());
        assert!(Checksum::parse("MD5:900150983CD24FB0D6963F7D28E17F72").is_ok());
    }

    const ABC_MD5: &str = "md5:900150983cd24fb0d6963f7d28e17f72";
    const ABC_SHA256: &str =
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn several_digests_at_once_all_must_match() {
        let list = Checksum::parse_list(&format!(" {ABC_MD5}, {ABC_SHA256} ,")).expect("list");
        assert_eq!(list.len(), 2);
        let mut r = HashingReader::new(&b"abc"[..], list.clone());
        std::io::copy(&mut r, &mut std::io::sink()).expect("read");
        r.verify().expect("both match");
        let mut wrong = list;
        wrong.push(Checksum::parse(&ABC_SHA256.replace("ba78", "0000")).expect("parse"));
        let mut r = HashingReader::new(&b"abc"[..], wrong);
        std::io::copy(&mut r, &mut std::io::sink()).expect("read");
        let e = r.verify().expect_err("the third is wrong");
        assert!(
            e.to_string()
                .starts_with("checksum mismatch: expected sha256:0000"),
            "{e}"
        );
        assert!(Checksum::parse_list("sha256:abc,md5").is_err());
        assert_eq!(Checksum::parse_list(" ").expect("blank"), vec![]);
    }

    #[test]
    fn content_digest_per_rfc_9530() {
        // RFC 9530 appendix: sha-256 of "abc" in base64.
        let got = Checksum::parse_content_digest(
            "sha-256=:ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=:, unknown=:AAAA:",
        )
        .expect("parse");
        assert_eq!(got, vec![Checksum::parse(ABC_SHA256).expect("parse")]);
        assert!(Checksum::parse_content_digest("md5=:kAFQmDzST7DWlj99KOF/cg==:").is_err());
        assert!(Checksum::parse_content_digest("sha-256=ungWv48B").is_err());
        assert!(Checksum::parse_content_digest("sha-256=:AAAA:").is_err());
    }
}
