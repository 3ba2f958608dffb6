//! Registry mirrors for air-gapped clusters, as containers/image reads them
//! (containers-registries.conf(5), version 2): `[[registry]]` entries with `prefix`,
//! `location`, `insecure`, `blocked`, `mirror-by-digest-only`, and `[[registry.mirror]]`
//! entries (`location`, `insecure`, `pull-from-mirror`). A pull tries the mirrors of the
//! most specific matching entry in order, then the entry's location; one that fails is
//! logged and the next is tried. A blocked registry is refused. What a mirror serves for
//! a digest reference must hash to that digest (the registry client checks every
//! manifest fetched by digest), so a mirror cannot substitute another image.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The file containers/image reads when `CONTAINERS_REGISTRIES_CONF` is not set.
pub const DEFAULT_PATH: &str = "/etc/containers/registries.conf";

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("registries.conf {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("registry {0} is blocked by registries.conf")]
    Blocked(String),
    #[error("{0}")]
    Syntax(#[from] basic_toml::Error),
    #[error("a [[registry]] entry names neither a prefix nor a location")]
    NoPrefix,
}

#[derive(Debug, Default, Deserialize)]
struct File {
    #[serde(default)]
    registry: Vec<Entry>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Entry {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    location: String,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    blocked: bool,
    #[serde(default)]
    mirror_by_digest_only: bool,
    #[serde(default)]
    mirror: Vec<Mirror>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Mirror {
    location: String,
    #[serde(default)]
    insecure: bool,
    /// `all` (default), `digest-only` or `tag-only`.
    #[serde(default)]
    pull_from_mirror: Option<String>,
}

/// The parsed file.
#[derive(Debug, Default)]
pub struct Mirrors {
    entries: Vec<Entry>,
}

/// One place to pull from: `host[:port]/repository`, and whether TLS may be skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub registry: String,
    pub repository: String,
    pub insecure: bool,
    /// A mirror (not the entry's own location): logged as such.
    pub mirror: bool,
}

impl Mirrors {
    /// The file `explicit` names, else `CONTAINERS_REGISTRIES_CONF` (clap reads it into
    /// `explicit`), else the default path when it exists. An explicit file that cannot
    /// be read or parsed is an error; a broken default file is logged and ignored.
    pub fn load(explicit: Option<&Path>) -> Result<Self, MirrorError> {
        match explicit.filter(|p| !p.as_os_str().is_empty()) {
            Some(p) => Self::read(p),
            None => {
                let p = Path::new(DEFAULT_PATH);
                if !p.exists() {
                    return Ok(Mirrors::default());
                }
                Self::read(p).or_else(|e| {
                    tracing::warn!(error = %e, "ignoring the default registries.conf");
                    Ok(Mirrors::default())
                })
            }
        }
    }

    fn read(path: &Path) -> Result<Self, MirrorError> {
        let err = |message: String| MirrorError::File {
            path: path.to_path_buf(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        if meta.len() > 1 << 20 {
            return Err(err("larger than 1 MiB".into()));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::parse(&text).map_err(|e| err(e.to_string()))
    }

    pub fn parse(text: &str) -> Result<Self, MirrorError> {
        let f: File = basic_toml::from_str(text)?;
        let mut entries = f.registry;
        for e in &mut entries {
            if e.prefix.is_empty() {
                e.prefix = e.location.clone();
            }
            if e.location.is_empty() && !e.prefix.starts_with("*.") {
                e.location = e.prefix.clone();
            }
            if e.prefix.is_empty() {
                return Err(MirrorError::NoPrefix);
            }
        }
        Ok(Mirrors { entries })
    }

    /// The most specific entry matching `name` (`host[:port]/repository`), as
    /// containers/image picks it: the longest prefix at a path boundary, or a
    /// `*.domain` wildcard matching the host.
    fn entry_for(&self, name: &str) -> Option<&Entry> {
        self.entries
            .iter()
            .filter(|e| prefix_matches(&e.prefix, name))
            .max_by_key(|e| e.prefix.len())
    }

    /// Where to pull `registry/repository` from, in order. `by_digest`: the reference
    /// pins a digest (mirrors with `mirror-by-digest-only` take only those).
    pub fn endpoints(
        &self,
        registry: &str,
        repository: &str,
        by_digest: bool,
        insecure: bool,
    ) -> Result<Vec<Endpoint>, MirrorError> {
        let name = format!("{registry}/{repository}");
        let origin = Endpoint {
            registry: registry.to_string(),
            repository: repository.to_string(),
            insecure,
            mirror: false,
        };
        let Some(e) = self.entry_for(&name) else {
            return Ok(vec![origin]);
        };
        if e.blocked {
            return Err(MirrorError::Blocked(registry.to_string()));
        }
        let rewrite = |location: &str| -> Option<(String, String)> {
            let rest = if e.prefix.starts_with("*.") {
                name.clone()
            } else {
                name.strip_prefix(&e.prefix)?.to_string()
            };
            let full = if e.prefix.starts_with("*.") {
                if location.is_empty() {
                    rest
                } else {
                    format!("{location}/{}", rest.split_once('/').map_or("", |r| r.1))
                }
            } else {
                format!("{location}{rest}")
            };
            let (reg, repo) = full.split_once('/')?;
            Some((reg.to_string(), repo.to_string()))
        };
        let mut out = Vec::new();
        for m in &e.mirror {
            let wanted = match m.pull_from_mirror.as_deref() {
                Some("digest-only") => by_digest,
                Some("tag-only") => !by_digest,
                _ => !e.mirror_by_digest_only || by_digest,
            };
            if !wanted {
                continue;
            }
            if let Some((reg, repo)) = rewrite(&m.location) {
                out.push(Endpoint {
                    registry: reg,
                    repository: repo,
                    insecure: insecure || m.insecure,
                    mirror: true,
                });
            }
        }
        match rewrite(&e.location) {
            Some((reg, repo)) => out.push(Endpoint {
                registry: reg,
                repository: repo,
                insecure: insecure || e.insecure,
                mirror: false,
            }),
            None => out.push(origin),
        }
        Ok(out)
    }
}

/// containers/image's prefix rule: `prefix` equals `name`, or is followed in it by `/`,
/// `:` or `@`; `*.example.com` matches any host under example.com.
fn prefix_matches(prefix: &str, name: &str) -> bool {
    if let Some(domain) = prefix.strip_prefix("*.") {
        let host = name.split('/').next().unwrap_or("");
        let host = host.split(':').next().unwrap_or(host);
        return host.ends_with(&format!(".{domain}"));
    }
    match name.strip_prefix(prefix) {
        Some("") => true,
        Some(rest) => rest.starts_with(['/', ':', '@']) || prefix.ends_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = r#"
unqualified-search-registries = ["docker.io"]

[[registry]]
prefix = "quay.io/kubevirt"
location = "origin.example:5000/kubevirt"
mirror-by-digest-only = false

[[registry.mirror]]
location = "dead.example:1/kv"

[[registry.mirror]]
location = "live.example:5000/kv"
insecure = true

[[registry]]
location = "digests.example"
mirror-by-digest-only = true
[[registry.mirror]]
location = "m.example"

[[registry]]
prefix = "blocked.example"
blocked = true
"#;

    #[test]
    fn mirrors_are_tried_in_order_then_the_location() {
        let m = Mirrors::parse(CONF).expect("parse");
        let e = m
            .endpoints("quay.io", "kubevirt/fedora", false, false)
            .expect("endpoints");
        let got: Vec<(String, String, bool, bool)> = e
            .into_iter()
            .map(|e| (e.registry, e.repository, e.insecure, e.mirror))
            .collect();
        assert_eq!(
            got,
            [
                ("dead.example:1".into(), "kv/fedora".into(), false, true),
                ("live.example:5000".into(), "kv/fedora".into(), true, true),
                (
                    "origin.example:5000".into(),
                    "kubevirt/fedora".into(),
                    false,
                    false
                ),
            ]
        );
        // Not under the prefix (a path boundary is needed): untouched.
        let e = m
            .endpoints("quay.io", "kubevirtx/a", false, false)
            .expect("endpoints");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].registry, "quay.io");
    }

    #[test]
    fn digest_only_mirrors_and_blocked_registries() {
        let m = Mirrors::parse(CONF).expect("parse");
        let by_tag = m
            .endpoints("digests.example", "a/b", false, false)
            .expect("ok");
        assert_eq!(by_tag.len(), 1, "{by_tag:?}");
        let by_digest = m
            .endpoints("digests.example", "a/b", true, false)
            .expect("ok");
        assert_eq!(by_digest[0].registry, "m.example");
        assert!(matches!(
            m.endpoints("blocked.example", "x", false, false),
            Err(MirrorError::Blocked(_))
        ));
        assert!(Mirrors::parse("[[registry]]\ninsecure = true\n").is_err());
        assert!(Mirrors::parse("not toml [").is_err());
    }
}
