//! Talking to remote parties, all of which are treated as hostile: the bounded body
//! reader (`body`), redirects that keep credentials on their origin (`follow`), and the
//! distribution-registry client (`registry`), and the HTTPS transport for large bodies
//! (`direct`). Every request has a connect timeout (the
//! client's) and an idle timeout on its response; every small body is read bounded.

pub mod body;
pub mod direct;
pub mod follow;
pub mod registry;

use ferrydisk_common::ErrorKind;

/// What a failed request failed on, and its kind: a TLS cause named (unknown authority,
/// expired, wrong host name, handshake refused; a certificate the pod will never accept
/// is a configuration error), else the error chain on one line (reqwest's own Display
/// says only "error sending request"), any URL in it without credentials.
pub fn describe(e: &reqwest::Error) -> (ErrorKind, String) {
    if let Some(tls) = ferrydisk_common::tls_failure::diagnose(e) {
        return (tls.kind, tls.message());
    }
    let s = ferrydisk_common::error::chain_line(e);
    let s = match e.url() {
        Some(u) => s.replace(u.as_str(), &crate::sources::redact::url(u.as_str())),
        None => s,
    };
    (ErrorKind::Network, s)
}
