//! The one origin rule for everything remote. Credentials (a registry's Basic or Bearer
//! header, an object store's signature or session token, the user's secret extra
//! headers) belong to the origin they were given for: the scheme, host and port of the
//! URL the user named (RFC 6454). A redirect or an upload `Location` that leaves that
//! origin is followed with none of them, and an `https` origin never sends them over
//! plain `http`. Pure functions, so the rule is unit-tested and fuzzed
//! (`fuzz/fuzz_targets/origin.rs`) apart from any network code.

use url::Url;

/// The longest `Location` (or challenge) value looked at: anything longer is refused.
pub const MAX_HEADER_VALUE: usize = 8 << 10;

/// Scheme, host and port (the port filled in from the scheme when the URL has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    /// The origin of an `http` or `https` URL; `None` for any other scheme.
    pub fn of(url: &Url) -> Option<Origin> {
        if !matches!(url.scheme(), "http" | "https") {
            return None;
        }
        Some(Origin {
            scheme: url.scheme().to_string(),
            host: url.host_str()?.to_ascii_lowercase(),
            port: url.port_or_known_default()?,
        })
    }

    pub fn is_https(&self) -> bool {
        self.scheme == "https"
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

/// What a request to some URL may carry, given whose credentials we hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// The same origin: credentials and secret headers go along.
    Credentials,
    /// Another origin: the request goes without any of them.
    Nothing,
    /// The owner is `https` and this URL is plain `http`: a downgrade. A download may
    /// follow it bare (CDI's client does); a registry upload refuses it.
    Downgrade,
}

/// What a request to `next` may carry when the credentials belong to `owner`.
pub fn carry(owner: &Origin, next: &Url) -> Carry {
    match Origin::of(next) {
        Some(o) if o == *owner => Carry::Credentials,
        Some(o) if owner.is_https() && !o.is_https() => Carry::Downgrade,
        _ => Carry::Nothing,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocationError {
    #[error("the server sent a Location of {0} bytes")]
    TooLong(usize),
    #[error("the server sent a Location that is not a URL ({0})")]
    Invalid(String),
    #[error("the server sent a Location with scheme {0:?}; only http and https are followed")]
    Scheme(String),
}

/// A `Location` header resolved against the URL that answered it. Only `http` and
/// `https` results are accepted (never `file:`, `data:` or anything a client would read
/// locally); user info in the result is dropped, so a server cannot plant credentials.
pub fn resolve_location(base: &Url, location: &str) -> Result<Url, LocationError> {
    if location.len() > MAX_HEADER_VALUE {
        return Err(LocationError::TooLong(location.len()));
    }
    let mut url = base
        .join(location.trim())
        .map_err(|e| LocationError::Invalid(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(LocationError::Scheme(
            url.scheme().chars().take(32).collect(),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(LocationError::Invalid("no host".into()));
    }
    let _ = url.set_username("");
    let _ = url.set_password(None);
    Ok(url)
}

/// `realm="https://auth",service="registry",scope="..."` as (lower-case key, value)
/// pairs, as a `WWW-Authenticate` challenge carries them. Quoted values may contain
/// commas; a value with no closing quote runs to the end.
pub fn challenge_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    if rest.len() > MAX_HEADER_VALUE {
        return out;
    }
    while !rest.is_empty() {
        let Some((k, v)) = rest.split_once('=') else {
            break;
        };
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let v = v.trim_start();
        let (value, tail) = if let Some(q) = v.strip_prefix('"') {
            match q.find('"') {
                Some(i) => (&q[..i], &q[i + 1..]),
                None => (q, ""),
            }
        } else {
            match v.find(',') {
                Some(i) => (&v[..i], &v[i..]),
                None => (v, ""),
            }
        };
        out.push((k, value.to_string()));
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Url {
        Url::parse(s).expect("url")
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        let owner = Origin::of(&u("https://reg.example:443/v2/")).expect("origin");
        assert_eq!(
            carry(&owner, &u("https://REG.example/v2/x/blobs/uploads/1")),
            Carry::Credentials
        );
        assert_eq!(
            carry(&owner, &u("https://reg.example:5000/v2/")),
            Carry::Nothing
        );
        assert_eq!(carry(&owner, &u("https://127.0.0.2/v2/")), Carry::Nothing);
        assert_eq!(
            carry(&owner, &u("http://reg.example/v2/")),
            Carry::Downgrade
        );
        assert_eq!(carry(&owner, &u("ftp://reg.example/x")), Carry::Nothing);
        let plain = Origin::of(&u("http://127.0.0.1:5000/")).expect("origin");
        assert_eq!(carry(&plain, &u("https://127.0.0.1:5000/")), Carry::Nothing);
        assert_eq!(
            carry(&plain, &u("http://127.0.0.1:5000/v2/")),
            Carry::Credentials
        );
        assert!(Origin::of(&u("file:///etc/passwd")).is_none());
    }

    #[test]
    fn locations_resolve_to_http_only_and_lose_user_info() {
        let base = u("https://reg.example/v2/a/blobs/uploads/");
        assert_eq!(
            resolve_location(&base, "/v2/a/blobs/uploads/123?_state=x")
                .expect("relative")
                .as_str(),
            "https://reg.example/v2/a/blobs/uploads/123?_state=x"
        );
        assert_eq!(
            resolve_location(&base, "http://u:p@127.0.0.2:8080/up")
                .expect("absolute")
                .as_str(),
            "http://127.0.0.2:8080/up"
        );
        assert!(matches!(
            resolve_location(&base, "file:///etc/shadow"),
            Err(LocationError::Scheme(_))
        ));
        assert!(matches!(
            resolve_location(&base, &"a".repeat(MAX_HEADER_VALUE + 1)),
            Err(LocationError::TooLong(_))
        ));
    }

    #[test]
    fn bearer_challenges_are_parsed() {
        let p = challenge_params(
            r#"realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(
            p,
            [
                (
                    "realm".to_string(),
                    "https://auth.example/token".to_string()
                ),
                ("service".to_string(), "registry.example".to_string()),
                ("scope".to_string(), "repository:a/b:pull,push".to_string()),
            ]
        );
        assert_eq!(challenge_params(r#"realm="unterminated"#).len(), 1);
        assert!(challenge_params("").is_empty());
    }
}
