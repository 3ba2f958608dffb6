//! Image references (`[domain/]path[:tag][@digest]`), parsed by hand with the grammar of
//! distribution's `reference` package, into the same [`Reference`] oci-spec's parser
//! gives. oci-spec parses with one large regex compiled on first use: 15-20 ms of CPU in
//! every import, a few percent of a whole registry import under a pod's CPU limit. The
//! unit tests check both parsers agree.

use oci_client::Reference;

const NAME_TOTAL_LENGTH_MAX: usize = 255;
const DOCKER_HUB: &str = "docker.io";

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("empty image reference")]
    Empty,
    #[error("invalid image reference format")]
    Format,
    #[error("repository name must not be more than {NAME_TOTAL_LENGTH_MAX} characters")]
    TooLong,
    #[error("invalid digest length")]
    DigestLength,
    #[error("unsupported digest algorithm")]
    DigestAlgorithm,
}

/// `[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]`
fn domain_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

/// `label(\.label)*(:[0-9]+)?`
fn domain(s: &str) -> bool {
    let host = match s.split_once(':') {
        Some((h, port)) => {
            if port.is_empty() || !port.bytes().all(|c| c.is_ascii_digit()) {
                return false;
            }
            h
        }
        None => s,
    };
    host.split('.').all(domain_label)
}

/// `[a-z0-9]+((?:[._]|__|[-]*)[a-z0-9]+)*`: alphanumeric runs joined by one `.`, one
/// `_`, `__`, or any number of `-`.
fn path_component(s: &str) -> bool {
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let b = s.as_bytes();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &s[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `(domain/)?component(/component)*`
fn name(s: &str) -> bool {
    let path = |p: &str| p.split('/').all(path_component);
    path(s)
        || s.split_once('/')
            .is_some_and(|(d, rest)| domain(d) && path(rest))
}

/// `[\w][\w.-]{0,127}` (ASCII `\w`, as in distribution's Go grammar).
fn tag(s: &str) -> bool {
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && word(b[0])
        && b.iter().all(|&c| word(c) || c == b'.' || c == b'-')
}

/// `[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[[:xdigit:]]{32,}`
fn digest(s: &str) -> bool {
    let Some((alg, hex)) = s.split_once(':') else {
        return false;
    };
    let alg_ok = alg.split(['-', '_', '+', '.']).all(|p| {
        p.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
            && p.bytes().all(|c| c.is_ascii_alphanumeric())
    });
    alg_ok && hex.len() >= 32 && hex.bytes().all(|c| c.is_ascii_hexdigit())
}

/// distribution's `splitDomain`: the first component is a registry only if it looks
/// like a host (a dot, a port, or `localhost`); Docker Hub's official images get
/// `library/`.
fn split_domain(name: &str) -> (String, String) {
    let (mut domain, remainder) = match name.split_once('/') {
        Some((left, right)) if left.contains(['.', ':']) || left == "localhost" => {
            (left.to_string(), right.to_string())
        }
        _ => (DOCKER_HUB.to_string(), name.to_string()),
    };
    if domain == "index.docker.io" {
        domain = DOCKER_HUB.to_string();
    }
    if domain == DOCKER_HUB && !remainder.contains('/') {
        return (domain, format!("library/{remainder}"));
    }
    (domain, remainder)
}

/// Parses `s` as oci-spec's `Reference::from_str` does (no tag and no digest means
/// `latest`).
pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
    if s.is_empty() {
        return Err(ReferenceError::Empty);
    }
    let (rest, dig) = match s.split_once('@') {
        Some((r, d)) if digest(d) => (r, Some(d)),
        Some(_) => return Err(ReferenceError::Format),
        None => (s, None),
    };
    // A tag follows the last ':' when no '/' comes after it (a port is always followed
    // by the path).
    let (n, t) = match rest.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => {
            if !tag(t) {
                return Err(ReferenceError::Format);
            }
            (n, Some(t))
        }
        _ => (rest, None),
    };
    if !name(n) {
        return Err(ReferenceError::Format);
    }
    let (registry, repository) = split_domain(n);
    if repository.len() > NAME_TOTAL_LENGTH_MAX {
        return Err(ReferenceError::TooLong);
    }
    if let Some(d) = dig {
        let want = match d.split_once(':').map(|(a, _)| a) {
            Some("sha256") => 64,
            Some("sha384") => 96,
            Some("sha512") => 128,
            _ => return Err(ReferenceError::DigestAlgorithm),
        };
        if d.len() - d.find(':').map_or(0, |i| i + 1) != want {
            return Err(ReferenceError::DigestLength);
        }
    }
    Ok(match (t, dig) {
        (Some(t), Some(d)) => {
            Reference::with_tag_and_digest(registry, repository, t.into(), d.into())
        }
        (None, Some(d)) => Reference::with_digest(registry, repository, d.into()),
        (t, None) => Reference::with_tag(registry, repository, t.unwrap_or("latest").into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(r: &Reference) -> (String, String, Option<String>, Option<String>) {
        (
            r.registry().to_string(),
            r.repository().to_string(),
            r.tag().map(str::to_string),
            r.digest().map(str::to_string),
        )
    }

    /// Ours and oci-spec's agree: the same fields, or both refuse. (oci-spec's `\w`
    /// is Unicode, distribution's Go grammar ASCII: a non-ASCII reference, which no
    /// registry accepts, is refused by ours.)
    fn agree(s: &str) {
        let theirs = s.parse::<Reference>();
        let ours = parse(s);
        if !s.is_ascii() {
            assert!(ours.is_err(), "{s:?}: {ours:?}");
            return;
        }
        match (&theirs, &ours) {
            (Ok(a), Ok(b)) => assert_eq!(fields(a), fields(b), "{s:?}"),
            (Err(_), Err(_)) => {}
            _ => panic!("{s:?}: oci-spec {theirs:?}, ours {ours:?}"),
        }
    }

    const SHA: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn agrees_with_oci_spec_on_the_usual_and_the_odd() {
        let cases = [
            "busybox",
            "ubuntu:24.04",
            "library/ubuntu",
            "index.docker.io/library/ubuntu:22",
            "docker.io/foo",
            "quay.io/containerdisks/fedora:41",
            "127.0.0.1:5000/disks/fedora:41",
            "localhost/x",
            "localhost:5000/a/b/c:tag_1.0-x",
            "test.com:tag",
            "test.com:5000",
            "test.com/repo:tag",
            "Uppercase/repo",
            "host.example/UPPER",
            "a/b__c/d---e/f.g/h_i",
            "a/b___c",
            "a/b._c",
            "a/-b",
            "a/b-",
            "a//b",
            "/a",
            "a/",
            ":tag",
            "a:",
            "a:-tag",
            "a:.tag",
            "a:_tag",
            &format!("a:{}", "t".repeat(128)),
            &format!("a:{}", "t".repeat(129)),
            &format!("a@{SHA}"),
            &format!("reg.io/a:1@{SHA}"),
            "a@sha256:0123",
            "a@sha512:0123456789abcdef0123456789abcdef",
            "a@md5:0123456789abcdef0123456789abcdef",
            "a@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdeg",
            "a@@b",
            "a@b@c",
            &format!("reg.io/{}", "a".repeat(255)),
            &format!("reg.io/{}", "a".repeat(256)),
            "[::1]:5000/x",
            "my-host.example.com:443/team/disk:v1",
            "-host.com/x",
            "host-.com/x",
            "host..com/x",
            "host.com:/x",
            "host.com:12a/x",
            "a b",
            "a:t t",
            "tést:tag",
            "a:tést",
        ];
        for c in cases {
            agree(c);
        }
    }

    #[test]
    fn agrees_with_oci_spec_on_random_strings() {
        // A small deterministic generator over the characters the grammar cares about.
        let alphabet: Vec<char> = "ab0Z.-_/:@".chars().collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 12) as usize + 1;
            let mut y = x;
            let s: String = (0..len)
                .map(|_| {
                    y = y.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    alphabet[(y >> 33) as usize % alphabet.len()]
                })
                .collect();
            agree(&s);
        }
    }
}
