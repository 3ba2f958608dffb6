//! CDI's upload token (docs/cdi-contract.md section 5.3): a PS256 JWT from cdi-apiserver, checked
//! with its public key. Malformed or missing: 400. Bad signature, wrong issuer, expired
//! or not yet valid: 401. Wrong operation or resource: 400.

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// CDI validates times with 10 s of leeway.
pub const LEEWAY_SECS: u64 = 10;
pub const ISSUER: &str = "cdi-apiserver";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenError {
    #[error("missing or malformed Authorization header")]
    Malformed,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token does not authorize an upload: {0}")]
    WrongPayload(String),
}

impl TokenError {
    pub fn status(&self) -> u16 {
        match self {
            TokenError::Invalid(_) => 401,
            _ => 400,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Gvr {
    #[serde(default)]
    resource: String,
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    operation: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    resource: Option<Gvr>,
}

/// Whom the token lets upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadTarget {
    pub namespace: String,
    pub pvc: String,
}

/// `Authorization: Bearer <token>` as CDI matches it:
/// `(?i)^Bearer\s+([A-Za-z0-9\-\._~\+\/]+)$`.
pub fn from_header(value: Option<&str>) -> Result<&str, TokenError> {
    let v = value.ok_or(TokenError::Malformed)?;
    if v.len() < 7 || !v[..6].eq_ignore_ascii_case("bearer") {
        return Err(TokenError::Malformed);
    }
    let rest = &v[6..];
    let token = rest.trim_start_matches([' ', '\t']);
    if token.len() == rest.len() || !is_token(token) {
        return Err(TokenError::Malformed);
    }
    Ok(token)
}

pub fn is_token(t: &str) -> bool {
    !t.is_empty()
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

pub struct Verifier {
    key: DecodingKey,
}

impl Verifier {
    /// `pem`: exactly one RSA public key (APISERVER_PUBLIC_KEY).
    pub fn new(pem: &[u8]) -> Result<Self, jsonwebtoken::errors::Error> {
        Ok(Verifier {
            key: DecodingKey::from_rsa_pem(pem)?,
        })
    }

    pub fn verify(&self, token: &str, now: u64) -> Result<UploadTarget, TokenError> {
        let mut v = Validation::new(Algorithm::PS256);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        v.set_issuer(&[ISSUER]);
        v.set_required_spec_claims(&["exp", "iss"]);
        let data = decode::<Claims>(token, &self.key, &v)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let c = data.claims;
        if c.iat.is_some_and(|iat| iat > now + LEEWAY_SECS) {
            return Err(TokenError::Invalid("issued in the future".into()));
        }
        if c.operation != "Upload" {
            return Err(TokenError::WrongPayload(format!(
                "operation {:?}",
                c.operation
            )));
        }
        if c.name.is_empty() || c.namespace.is_empty() {
            return Err(TokenError::WrongPayload("no PVC name or namespace".into()));
        }
        if c.resource.as_ref().map(|r| r.resource.as_str()) != Some("persistentvolumeclaims") {
            return Err(TokenError::WrongPayload(
                "resource is not persistentvolumeclaims".into(),
            ));
        }
        Ok(UploadTarget {
            namespace: c.namespace,
            pvc: c.name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_forms() {
        assert_eq!(from_header(Some("Bearer abc.def-ghi")), Ok("abc.def-ghi"));
        assert_eq!(from_header(Some("bearer \t abc")), Ok("abc"));
        assert_eq!(from_header(Some("Bearerabc")), Err(TokenError::Malformed));
        assert_eq!(from_header(Some("Basic abc")), Err(TokenError::Malformed));
        assert_eq!(from_header(Some("Bearer a b")), Err(TokenError::Malformed));
        assert_eq!(from_header(None), Err(TokenError::Malformed));
        assert_eq!(TokenError::Invalid(String::new()).status(), 401);
    }
}
