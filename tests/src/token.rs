//! Upload tokens as cdi-apiserver mints them (PS256, CDI's claims), for tests and the
//! demo. Never part of a product binary: signing tokens is the API server's job.

use serde_json::json;

pub struct Claims<'a> {
    pub namespace: &'a str,
    pub pvc: &'a str,
    pub issuer: &'a str,
    pub operation: &'a str,
    pub resource: &'a str,
    /// Seconds from now; negative for an expired token.
    pub expires_in: i64,
    /// Seconds from now the token becomes valid.
    pub not_before_in: i64,
}

impl<'a> Claims<'a> {
    pub fn upload(namespace: &'a str, pvc: &'a str) -> Self {
        Claims {
            namespace,
            pvc,
            issuer: "cdi-apiserver",
            operation: "Upload",
            resource: "persistentvolumeclaims",
            expires_in: 300,
            not_before_in: 0,
        }
    }
}

pub fn mint(private_key_pem: &[u8], c: &Claims<'_>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let body = json!({
        "iss": c.issuer,
        "iat": now,
        "nbf": now + c.not_before_in,
        "exp": now + c.expires_in,
        "operation": c.operation,
        "name": c.pvc,
        "namespace": c.namespace,
        "resource": {"group": "", "version": "v1", "resource": c.resource},
    });
    let key =
        jsonwebtoken::EncodingKey::from_rsa_pem(private_key_pem).expect("RSA private key PEM");
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::PS256),
        &body,
        &key,
    )
    .expect("sign")
}
