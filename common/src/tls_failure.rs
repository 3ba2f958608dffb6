//! What a failed TLS connection failed on, in words a user can act on. reqwest and
//! hyper report a refused certificate as "error sending request for url ..."; the
//! rustls error inside says why. [`diagnose`] finds it anywhere in an error chain and
//! names the cause (unknown authority, expired, wrong host name, handshake refused)
//! with CDI's x509 wording where Go has one, and how to fix it. A certificate the pod
//! will never accept is a configuration error ([`ErrorKind::Config`]): running the
//! import again cannot help.

use crate::ErrorKind;

/// A TLS failure named: what failed, and what fixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFailure {
    pub kind: ErrorKind,
    /// `the server's certificate is signed by an unknown authority (x509: ...)`.
    pub cause: String,
    /// How to fix it, from an importer's side.
    pub fix: &'static str,
}

impl TlsFailure {
    /// The one-line message: `TLS: <cause>; <fix>`.
    pub fn message(&self) -> String {
        format!("TLS: {}; {}", self.cause, self.fix)
    }
}

const FIX_CA: &str =
    "add the CA that signed it to IMPORTER_CERT_DIR (a ConfigMap of the DataVolume's certConfigMap), or set INSECURE_TLS for a registry you trust";

/// The TLS cause of `err`, if a rustls error is anywhere in its chain.
pub fn diagnose(err: &(dyn std::error::Error + 'static)) -> Option<TlsFailure> {
    let e = crate::error::find_in_chain::<rustls::Error>(err)?;
    Some(describe(e))
}

/// The words for one rustls error.
pub fn describe(e: &rustls::Error) -> TlsFailure {
    use rustls::CertificateError as C;
    let cert = |what: &str, fix: &'static str| TlsFailure {
        kind: ErrorKind::Config,
        cause: format!("the server's certificate {what}"),
        fix,
    };
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => cert(
                "is signed by an unknown authority (x509: certificate signed by unknown authority)",
                FIX_CA,
            ),
            C::Expired | C::ExpiredContext { .. } => cert(
                "has expired (x509: certificate has expired or is not yet valid)",
                "the server must present a current certificate",
            ),
            C::NotValidYet | C::NotValidYetContext { .. } => cert(
                "is not valid yet (x509: certificate has expired or is not yet valid)",
                "check the server's certificate and the node's clock",
            ),
            C::NotValidForName | C::NotValidForNameContext { .. } => cert(
                "is not valid for the host name in the URL (x509: certificate is not valid for this name)",
                "use the name the certificate was issued for",
            ),
            C::Revoked => cert("is revoked", "the server must present another certificate"),
            C::BadSignature => cert(
                "has a bad signature (x509: certificate signed by unknown authority)",
                FIX_CA,
            ),
            other => cert(
                &format!("was refused ({other:?})"),
                "the server must present a certificate that verifies",
            ),
        },
        rustls::Error::AlertReceived(alert) => TlsFailure {
            kind: ErrorKind::SourceRefused,
            cause: format!("the server refused the handshake (alert {alert:?})"),
            fix: "it may want a client certificate or a TLS version this client does not offer",
        },
        rustls::Error::NoCertificatesPresented => cert(
            "is missing (the server presented none)",
            "the server must present a certificate",
        ),
        other => TlsFailure {
            kind: ErrorKind::Network,
            cause: format!("the handshake failed ({other})"),
            fix: "check that the URL names a TLS server",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn found_inside_io_errors() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::other(inner);
        let f = diagnose(&io).expect("found");
        assert_eq!(f.kind, ErrorKind::Config);
        assert!(f.message().contains("unknown authority"));
        assert!(f.message().contains("IMPORTER_CERT_DIR"));
        let plain = std::io::Error::other("connection refused");
        assert!(diagnose(&plain).is_none());
    }
}
