//! The tus 1.0 resumable upload protocol (<https://tus.io/protocols/resumable-upload>):
//! its headers, parsed and checked the way the spec words them. Core, creation, checksum
//! and termination; the upload server serves it, the proxy forwards it.

use base64::Engine;

/// The protocol version served, and the only one accepted in `Tus-Resumable`.
pub const VERSION: &str = "1.0.0";
/// The extensions served (`Tus-Extension` in an `OPTIONS` answer).
pub const EXTENSIONS: &str = "creation,checksum,termination";
/// The algorithms a PATCH's `Upload-Checksum` may name.
pub const CHECKSUM_ALGORITHMS: &str = "sha1,sha256,sha512,md5";
/// The content type of a PATCH body.
pub const PATCH_CONTENT_TYPE: &str = "application/offset+octet-stream";
/// tus's status for an `Upload-Checksum` that does not match the PATCH's body.
pub const CHECKSUM_MISMATCH: u16 = 460;
/// The first bytes of an upload whose sha256 names it (ferrydisk's `head` metadata key):
/// what the server computes and a returning client sends.
pub const HEAD_LEN: u64 = 1 << 20;

/// A header the spec defines whose value is not what it must be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{name} is not a non-negative integer: {value:?}")]
    NotANumber { name: &'static str, value: String },
    #[error("Upload-Metadata is not a list of `key base64-value` pairs: {0:?}")]
    Metadata(String),
    #[error(
        "Upload-Checksum is not `algorithm base64-digest` for one of {CHECKSUM_ALGORITHMS}: {0:?}"
    )]
    Checksum(String),
}

/// `Upload-Offset` or `Upload-Length`: a non-negative decimal integer, nothing else
/// (no sign, no spaces inside, at most 19 digits so it fits).
pub fn parse_u64(name: &'static str, value: Option<&str>) -> Result<u64, HeaderError> {
    let v = value.ok_or(HeaderError::Missing(name))?.trim();
    let bad = || HeaderError::NotANumber {
        name,
        value: clip(v),
    };
    if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    v.parse().map_err(|_| bad())
}

/// `Upload-Metadata`: comma-separated `key base64value` pairs (a key alone has an empty
/// value). Keys are ASCII without spaces or commas; values must decode as UTF-8.
pub fn parse_metadata(value: &str) -> Result<Vec<(String, String)>, HeaderError> {
    let bad = || HeaderError::Metadata(clip(value));
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut parts = pair.split(' ').filter(|p| !p.is_empty());
        let key = parts.next().ok_or_else(bad)?;
        let val = match parts.next() {
            Some(b64) => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|_| bad())?;
                String::from_utf8(raw).map_err(|_| bad())?
            }
            None => String::new(),
        };
        if parts.next().is_some() || !key.is_ascii() || out.iter().any(|(k, _)| k == key) {
            return Err(bad());
        }
        out.push((key.to_string(), val));
    }
    Ok(out)
}

/// `Upload-Metadata` from pairs (what a client sends).
pub fn encode_metadata(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{k} {}",
                base64::engine::general_purpose::STANDARD.encode(v.as_bytes())
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A PATCH's `Upload-Checksum`: the algorithm and the digest of that request's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchChecksum {
    /// One of [`CHECKSUM_ALGORITHMS`], as `IMPORTER_CHECKSUM` names it.
    pub algorithm: String,
    pub digest_hex: String,
}

pub fn parse_checksum(value: &str) -> Result<PatchChecksum, HeaderError> {
    let bad = || HeaderError::Checksum(clip(value));
    let (alg, b64) = value.trim().split_once(' ').ok_or_else(bad)?;
    let alg = alg.to_ascii_lowercase();
    let len = match alg.as_str() {
        "md5" => 16,
        "sha1" => 20,
        "sha256" => 32,
        "sha512" => 64,
        _ => return Err(bad()),
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| bad())?;
    if raw.len() != len {
        return Err(bad());
    }
    Ok(PatchChecksum {
        algorithm: alg,
        digest_hex: hex::encode(raw),
    })
}

impl PatchChecksum {
    /// The same digest in `IMPORTER_CHECKSUM` syntax, for the verifier.
    pub fn as_checksum(&self) -> crate::checksum::Checksum {
        crate::checksum::Checksum::parse(&format!("{}:{}", self.algorithm, self.digest_hex))
            .expect("a digest of the algorithm's length")
    }
}

fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_plain_non_negative_integers() {
        assert_eq!(parse_u64("Upload-Offset", Some("0")), Ok(0));
        assert_eq!(parse_u64("Upload-Offset", Some(" 42 ")), Ok(42));
        for bad in ["-1", "+1", "1e3", "", "0x10", "1 2", "99999999999999999999"] {
            assert!(parse_u64("Upload-Offset", Some(bad)).is_err(), "{bad}");
        }
        assert_eq!(
            parse_u64("Upload-Length", None),
            Err(HeaderError::Missing("Upload-Length"))
        );
    }

    #[test]
    fn metadata_round_trips_and_refuses_junk() {
        let enc = encode_metadata(&[("filename", "disk.img"), ("checksum", "sha256:ab")]);
        assert_eq!(
            parse_metadata(&enc).expect("meta"),
            vec![
                ("filename".into(), "disk.img".into()),
                ("checksum".into(), "sha256:ab".into())
            ]
        );
        assert_eq!(
            parse_metadata("is_confidential").expect("meta"),
            vec![("is_confidential".into(), String::new())]
        );
        assert!(parse_metadata("a !!!").is_err());
        assert!(parse_metadata("a YQ==,a YQ==").is_err());
        assert!(parse_metadata("a YQ== YQ==").is_err());
    }

    #[test]
    fn patch_checksums() {
        // sha1 of "abc"
        let c = parse_checksum("sha1 qZk+NkcGgWq6PiVxeFDCbJzQ2J0=").expect("sum");
        assert_eq!(c.digest_hex, "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(c.as_checksum().algorithm(), "sha1");
        assert!(parse_checksum("crc32 AAAA").is_err());
        assert!(parse_checksum("sha1 AAAA").is_err());
        assert!(parse_checksum("sha1").is_err());
    }
}
