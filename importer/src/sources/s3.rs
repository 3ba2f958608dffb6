//! S3 source (`IMPORTER_SOURCE=s3`): CDI's endpoint forms, AWS Signature Version 4 on
//! the existing HTTP client (no SDK), and the HTTP source's resumable ranged download,
//! with `If-Match` on every resume so a replaced object is refused instead of spliced.
//!
//! Endpoints (CDI's first two; the third is what AWS's console copies):
//! - `s3://bucket/key`: AWS, `https://s3.<region>.amazonaws.com`;
//! - `http(s)://host[:port]/bucket/key`: any S3-compatible store (MinIO, Ceph RGW),
//!   CDI's path-style reading;
//! - `https://bucket.s3.<region>.amazonaws.com/key`: a virtual-hosted AWS URL.
//!
//! Addressing (`--s3-addressing`): `path` sends `host/bucket/key`, `virtual` sends
//! `bucket.host/key`; `auto` is path-style for an explicit endpoint (as CDI) and
//! virtual-hosted for AWS when the bucket name allows it.

use super::http::Authorize;
use super::redact;
use futures_util::future::BoxFuture;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::{RequestBuilder, Url};
use ring::hmac;
use sha2::{Digest, Sha256};
use std::time::SystemTime;

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error(
        "invalid S3 endpoint {0:?}: expected s3://bucket/key or http(s)://host[:port]/bucket/key"
    )]
    Endpoint(String),
    #[error("invalid --s3-addressing {0:?}: expected auto, path or virtual")]
    Addressing(String),
    #[error("S3 bucket {0:?} cannot be addressed virtual-hosted (not a DNS label); use --s3-addressing path")]
    NotDnsBucket(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressing {
    Auto,
    Path,
    Virtual,
}

impl Addressing {
    pub fn parse(s: &str) -> Result<Self, S3Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Addressing::Auto),
            "path" => Ok(Addressing::Path),
            "virtual" | "virtual-host" | "virtual-hosted" => Ok(Addressing::Virtual),
            _ => Err(S3Error::Addressing(s.into())),
        }
    }
}

/// Where an object is and how to ask for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub bucket: String,
    pub key: String,
    /// The URL the GET goes to, path already in SigV4's canonical encoding.
    pub url: Url,
    pub region: String,
}

impl Object {
    /// `bucket/key` for logs and errors.
    pub fn shown(&self) -> String {
        format!("{}/{}", self.bucket, self.key)
    }
}

/// SigV4's URI encoding: every byte but `A-Z a-z 0-9 - _ . ~` (and `/` between
/// segments) as `%XX`, which is also what goes on the wire, so both sides hash the same.
const SIGV4: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn encode_key(key: &str) -> String {
    key.split('/')
        .map(|seg| utf8_percent_encode(seg, SIGV4).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// The region of an AWS host (`s3.eu-west-1.amazonaws.com`, `bucket.s3-eu-west-1...`).
fn aws_region(host: &str) -> Option<Option<String>> {
    let rest = host.strip_suffix(".amazonaws.com")?;
    let at = rest.rfind("s3")?;
    let after = &rest[at + 2..];
    let region = after.trim_start_matches(['.', '-']);
    Some((!region.is_empty()).then(|| region.to_string()))
}

/// A bucket name that can be a DNS label under the endpoint (AWS's rule, minus dots:
/// a dotted bucket breaks the endpoint's TLS wildcard).
fn dns_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !b.starts_with('-')
        && !b.ends_with('-')
}

/// Where `endpoint` says the object is: (bucket, key, base host[:port], scheme, an
/// explicit non-AWS endpoint?), for the three forms (`s3://bucket/key`, AWS virtual-
/// hosted and path-style URLs, any other endpoint path-style).
fn locate(
    endpoint: &str,
    region: Option<&str>,
) -> Result<(String, String, String, &'static str, bool), S3Error> {
    let bad = || S3Error::Endpoint(redact::url(endpoint));
    let url = Url::parse(endpoint.trim()).map_err(|_| bad())?;
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(bad)?;
    let path = url.path().trim_start_matches('/');
    let decoded = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    Ok(match url.scheme() {
        "s3" => {
            let region = region.unwrap_or("us-east-1");
            let base = if region == "us-east-1" {
                "s3.amazonaws.com".to_string()
            } else {
                format!("s3.{region}.amazonaws.com")
            };
            (host.to_string(), decoded(path), base, "https", false)
        }
        "http" | "https" => {
            let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
            match aws_region(host) {
                // https://bucket.s3.region.amazonaws.com/key
                Some(_) if !host.starts_with("s3.") && !host.starts_with("s3-") => {
                    let at = host.find(".s3").ok_or_else(bad)?;
                    (
                        host[..at].to_string(),
                        decoded(path),
                        format!("{}{port}", &host[at + 1..]),
                        scheme_of(&url),
                        false,
                    )
                }
                aws => {
                    let (b, k) = path.split_once('/').unwrap_or((path, ""));
                    (
                        decoded(b),
                        decoded(k),
                        format!("{host}{port}"),
                        scheme_of(&url),
                        aws.is_none(),
                    )
                }
            }
        }
        _ => return Err(bad()),
    })
}

fn scheme_of(url: &Url) -> &'static str {
    if url.scheme() == "http" {
        "http"
    } else {
        "https"
    }
}

/// Parses `endpoint` into the object and the URL to GET. `region` overrides what the
/// host implies (AWS hosts name theirs; anything else is `us-east-1`, what MinIO and
/// Ceph RGW expect by default; CDI would sign with the host's first label).
pub fn resolve(
    endpoint: &str,
    region: Option<&str>,
    addressing: Addressing,
) -> Result<Object, S3Error> {
    let bad = || S3Error::Endpoint(redact::url(endpoint));
    let (bucket, key, base, scheme, explicit) = locate(endpoint, region)?;
    if bucket.is_empty() || key.is_empty() {
        return Err(bad());
    }
    let host_only = base.split(':').next().unwrap_or(&base);
    let region = match region {
        Some(r) if !r.trim().is_empty() => r.trim().to_string(),
        _ => aws_region(host_only)
            .flatten()
            .unwrap_or_else(|| "us-east-1".into()),
    };
    let virtual_host = match addressing {
        Addressing::Path => false,
        Addressing::Virtual => {
            if !dns_bucket(&bucket) {
                return Err(S3Error::NotDnsBucket(bucket));
            }
            true
        }
        Addressing::Auto => !explicit && dns_bucket(&bucket),
    };
    let target = if virtual_host {
        format!("{scheme}://{bucket}.{base}/{}", encode_key(&key))
    } else {
        format!(
            "{scheme}://{base}/{}/{}",
            utf8_percent_encode(&bucket, SIGV4),
            encode_key(&key)
        )
    };
    let url = Url::parse(&target).map_err(|_| bad())?;
    Ok(Object {
        bucket,
        key,
        url,
        region,
    })
}

/// AWS Signature Version 4 for GETs: `host`, `x-amz-date` and
/// `x-amz-content-sha256: UNSIGNED-PAYLOAD` signed, no query string.
pub struct SigV4 {
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    /// `AWS_SESSION_TOKEN` for temporary credentials.
    pub session_token: Option<String>,
}

const UNSIGNED: &str = "UNSIGNED-PAYLOAD";

impl SigV4 {
    /// The headers to add to a GET of `url` at `now` (seconds since the epoch).
    pub fn headers(&self, url: &Url, now: u64) -> Vec<(&'static str, String)> {
        let (date, stamp) = amz_dates(now);
        let host = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or("")),
            None => url.host_str().unwrap_or("").to_string(),
        };
        let mut names = vec![
            ("host", host),
            ("x-amz-content-sha256", UNSIGNED.to_string()),
            ("x-amz-date", stamp.clone()),
        ];
        if let Some(t) = &self.session_token {
            names.push(("x-amz-security-token", t.clone()));
        }
        let canonical_headers: String = names.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
        let signed: Vec<&str> = names.iter().map(|(k, _)| *k).collect();
        let signed = signed.join(";");
        let query = canonical_query(url);
        let canonical = format!(
            "GET\n{}\n{query}\n{canonical_headers}\n{signed}\n{UNSIGNED}",
            url.path()
        );
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        let mut key = hmac_sha256(
            format!("AWS4{}", self.secret_key).as_bytes(),
            date.as_bytes(),
        );
        for part in [self.region.as_str(), "s3", "aws4_request"] {
            key = hmac_sha256(&key, part.as_bytes());
        }
        let signature = hex::encode(hmac_sha256(&key, to_sign.as_bytes()));
        let mut out: Vec<(&'static str, String)> =
            names.into_iter().filter(|(k, _)| *k != "host").collect();
        out.push((
            "authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
                self.access_key
            ),
        ));
        out
    }
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
        .as_ref()
        .to_vec()
}

/// The sorted, SigV4-encoded query (empty for a plain GET).
fn canonical_query(url: &Url) -> String {
    let mut pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            (
                utf8_percent_encode(&k, SIGV4).to_string(),
                utf8_percent_encode(&v, SIGV4).to_string(),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// (`YYYYMMDD`, `YYYYMMDDTHHMMSSZ`) in UTC.
fn amz_dates(now: u64) -> (String, String) {
    let days = now / 86_400;
    let secs = now % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let date = format!("{y:04}{m:02}{d:02}");
    let stamp = format!(
        "{date}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
    (date, stamp)
}

impl Authorize for SigV4 {
    fn authorize<'a>(
        &'a self,
        mut req: RequestBuilder,
        url: &'a Url,
    ) -> BoxFuture<'a, Result<RequestBuilder, crate::net::follow::AuthError>> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for (k, v) in self.headers(url, now) {
            req = req.header(k, v);
        }
        Box::pin(async move { Ok(req) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_as_cdi_reads_them_and_aws_forms() {
        let o = resolve(
            "http://10.0.0.5:9000/disks/images/f%20o.qcow2",
            None,
            Addressing::Auto,
        )
        .expect("path-style");
        assert_eq!(
            (o.bucket.as_str(), o.key.as_str()),
            ("disks", "images/f o.qcow2")
        );
        assert_eq!(
            o.url.as_str(),
            "http://10.0.0.5:9000/disks/images/f%20o.qcow2"
        );
        assert_eq!(o.region, "us-east-1");

        let o = resolve("s3://disks/a+b.img", Some("eu-west-1"), Addressing::Auto).expect("s3");
        assert_eq!(
            o.url.as_str(),
            "https://disks.s3.eu-west-1.amazonaws.com/a%2Bb.img"
        );
        let o = resolve("s3://my.disks/x", None, Addressing::Auto).expect("dotted");
        assert_eq!(o.url.as_str(), "https://s3.amazonaws.com/my.disks/x");

        let o = resolve(
            "https://disks.s3.us-west-2.amazonaws.com/x/y.raw",
            None,
            Addressing::Auto,
        )
        .expect("virtual given");
        assert_eq!(
            (o.bucket.as_str(), o.region.as_str()),
            ("disks", "us-west-2")
        );
        assert_eq!(
            o.url.as_str(),
            "https://disks.s3.us-west-2.amazonaws.com/x/y.raw"
        );
        let o = resolve(
            "https://s3.us-west-2.amazonaws.com/disks/y.raw",
            None,
            Addressing::Path,
        )
        .expect("aws path");
        assert_eq!(
            o.url.as_str(),
            "https://s3.us-west-2.amazonaws.com/disks/y.raw"
        );

        let o =
            resolve("http://localhost:9000/disks/k", None, Addressing::Virtual).expect("virtual");
        assert_eq!(o.url.as_str(), "http://disks.localhost:9000/k");
        assert!(resolve("http://h/Bad_Bucket/k", None, Addressing::Virtual).is_err());
        assert!(resolve("http://h/bucket-only", None, Addressing::Auto).is_err());
        assert!(resolve("ftp://h/b/k", None, Addressing::Auto).is_err());
        assert!(Addressing::parse("sideways").is_err());
    }

    /// The same GET signed by botocore's `S3SigV4Auth` (AWS's example credentials,
    /// UNSIGNED-PAYLOAD, at 2026-12-02T06:11:07Z).
    #[test]
    fn signature_matches_botocore() {
        let s = SigV4 {
            access_key: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            region: "us-east-1".into(),
            session_token: None,
        };
        let url = Url::parse("https://examplebucket.s3.amazonaws.com/test.txt").expect("url");
        let h = s.headers(&url, 1_796_191_867);
        let auth = &h
            .iter()
            .find(|(k, _)| *k == "authorization")
            .expect("auth")
            .1;
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20261202/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=a444c87d1ab4c070b3370a38297d7acac939ee12ade364af862add6f0c9f0ce7"
        );
    }

    #[test]
    fn dates_in_utc() {
        assert_eq!(
            amz_dates(1_369_353_600),
            ("20130524".into(), "20130524T000000Z".into())
        );
        assert_eq!(
            amz_dates(951_782_400 + 86_399),
            ("20000229".into(), "20000229T235959Z".into())
        );
    }
}
