//! CDI's upload endpoints (docs/cdi-contract.md section 4.4): the one table both the
//! upload server (which serves every path) and the upload proxy (which forwards the
//! ones a client calls; archive uploads reach the server by the proxy's rewrite) use.

/// What an upload path asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The answer comes once the body is in; the disk is finished after it.
    pub asynchronous: bool,
    /// A `multipart/form-data` body whose `file` field is the disk.
    pub form: bool,
    /// A tar unpacked into the filesystem volume.
    pub archive: bool,
}

const fn r(asynchronous: bool, form: bool, archive: bool) -> Route {
    Route {
        asynchronous,
        form,
        archive,
    }
}

/// Every upload endpoint under `/v1beta1/` and `/v1alpha1/`.
const ENDPOINTS: [(&str, Route); 5] = [
    ("upload", r(false, false, false)),
    ("upload-async", r(true, false, false)),
    ("upload-form", r(false, true, false)),
    ("upload-form-async", r(true, true, false)),
    ("upload-archive", r(false, false, true)),
];

const VERSIONS: [&str; 2] = ["/v1beta1/", "/v1alpha1/"];

/// The route of an exact upload path.
pub fn route(path: &str) -> Option<Route> {
    let rest = VERSIONS.iter().find_map(|v| path.strip_prefix(v))?;
    ENDPOINTS
        .iter()
        .find(|(name, _)| *name == rest)
        .map(|(_, route)| *route)
}

/// The paths a client uploads to through the proxy (every one but the archive
/// endpoint, which the proxy picks itself for an archive PVC).
pub fn client_paths() -> impl Iterator<Item = String> {
    VERSIONS.iter().flat_map(|v| {
        ENDPOINTS
            .iter()
            .filter(|(_, route)| !route.archive)
            .map(move |(name, _)| format!("{v}{name}"))
    })
}

/// The tus creation URL (docs/upload.md, "Resumable uploads"): `POST` here creates an
/// upload whose `Location` is under it.
pub const RESUMABLE: &str = "/v1beta1/upload-resumable";

/// What a resumable-upload path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumable<'a> {
    /// The creation URL.
    Create,
    /// One upload, by its id.
    Upload(&'a str),
}

/// The resumable-upload path `path` names, if it is one: the creation URL or one
/// segment under it (an id of URL-safe characters).
pub fn resumable(path: &str) -> Option<Resumable<'_>> {
    let rest = path.strip_prefix(RESUMABLE)?;
    if rest.is_empty() || rest == "/" {
        return Some(Resumable::Create);
    }
    let id = rest.strip_prefix('/')?;
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then_some(Resumable::Upload(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table() {
        assert_eq!(route("/v1beta1/upload"), Some(r(false, false, false)));
        assert_eq!(
            route("/v1alpha1/upload-form-async"),
            Some(r(true, true, false))
        );
        assert_eq!(
            route("/v1beta1/upload-archive"),
            Some(r(false, false, true))
        );
        assert_eq!(route("/v1beta1/uploads"), None);
        assert_eq!(route("/v2/upload"), None);
        let paths: Vec<String> = client_paths().collect();
        assert_eq!(paths.len(), 8);
        assert!(paths.iter().all(|p| route(p).is_some_and(|r| !r.archive)));
        assert_eq!(resumable(RESUMABLE), Some(Resumable::Create));
        assert_eq!(
            resumable("/v1beta1/upload-resumable/ab-9_Z"),
            Some(Resumable::Upload("ab-9_Z"))
        );
        assert_eq!(resumable("/v1beta1/upload-resumable/a/b"), None);
        assert_eq!(resumable("/v1beta1/upload-resumable/../x"), None);
        assert_eq!(resumable("/v1beta1/upload-resumablex"), None);
        assert_eq!(route(RESUMABLE), None);
    }
}
