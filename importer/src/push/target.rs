//! Where a push goes: a registry repository and tag (`docker://host[:port]/repo[:tag]`),
//! or a local layout or archive (`oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`,
//! `docker-archive:FILE[:NAME:TAG]`, written by [`super::save`]).

use std::path::PathBuf;

/// A `--dest` that names no place to push to.
#[derive(Debug, thiserror::Error)]
pub enum DestError {
    #[error("--dest {0:?} must be docker://host[:port]/repo[:tag]")]
    NotDocker(String),
    #[error("--dest {dest:?}: {message}")]
    Reference { dest: String, message: String },
    #[error("--dest {0:?}: a push needs a tag, not a digest")]
    Digest(String),
    #[error("--dest {0:?}: not a local layout or archive")]
    NotLocal(String),
    #[error("--dest {0:?}: a path and a tag are needed")]
    NoPathOrTag(String),
}

/// A registry repository and the tag the push writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dest {
    pub host: String,
    pub repo: String,
    pub tag: String,
}

impl Dest {
    pub fn parse(dest: &str) -> Result<Self, DestError> {
        let rest = dest
            .strip_prefix("docker://")
            .ok_or_else(|| DestError::NotDocker(dest.to_string()))?;
        let r = crate::sources::reference::parse(rest).map_err(|e| DestError::Reference {
            dest: dest.to_string(),
            message: e.to_string(),
        })?;
        if r.digest().is_some() {
            return Err(DestError::Digest(dest.to_string()));
        }
        let host = match r.resolve_registry() {
            "index.docker.io" => "registry-1.docker.io".to_string(),
            h => h.to_string(),
        };
        Ok(Dest {
            host,
            repo: r.repository().to_string(),
            tag: r.tag().unwrap_or("latest").to_string(),
        })
    }

    /// `host/repo:tag`, as the summary reports it.
    pub fn reference(&self) -> String {
        format!("{}/{}:{}", self.host, self.repo, self.tag)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Layout,
    OciArchive,
    DockerArchive,
}

/// A local destination: where, and the tag (or `name:tag` for docker-archive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    pub kind: Kind,
    pub path: PathBuf,
    pub tag: String,
}

const PREFIXES: [(&str, Kind); 3] = [
    ("oci:", Kind::Layout),
    ("oci-archive:", Kind::OciArchive),
    ("docker-archive:", Kind::DockerArchive),
];

impl Local {
    pub fn is_local(dest: &str) -> bool {
        PREFIXES.iter().any(|(p, _)| dest.starts_with(p))
    }

    /// The same syntax the import reads: `oci:DIR:TAG` splits at the last `:` (a tag has
    /// no `/`), `docker-archive:FILE:NAME:TAG` at the first.
    pub fn parse(dest: &str) -> Result<Self, DestError> {
        let (rest, kind) = PREFIXES
            .iter()
            .find_map(|(p, k)| dest.strip_prefix(p).map(|r| (r, *k)))
            .ok_or_else(|| DestError::NotLocal(dest.to_string()))?;
        let (path, tag) = match kind {
            Kind::DockerArchive => match rest.split_once(':') {
                Some((f, t)) => (f, t.to_string()),
                None => (rest, "ferrydisk/disk:latest".to_string()),
            },
            _ => match rest.rsplit_once(':') {
                Some((p, t)) if !t.contains('/') && !p.is_empty() => (p, t.to_string()),
                _ => (rest, "latest".to_string()),
            },
        };
        if path.is_empty() || tag.is_empty() {
            return Err(DestError::NoPathOrTag(dest.to_string()));
        }
        Ok(Local {
            kind,
            path: PathBuf::from(path),
            tag,
        })
    }

    pub fn shown(&self) -> String {
        let prefix = PREFIXES
            .iter()
            .find(|(_, k)| *k == self.kind)
            .map_or("", |(p, _)| p);
        format!("{prefix}{}:{}", self.path.display(), self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_need_docker_and_a_tag() {
        let d = Dest::parse("docker://127.0.0.1:5000/disks/fedora:41").expect("dest");
        assert_eq!(
            (d.host.as_str(), d.repo.as_str(), d.tag.as_str()),
            ("127.0.0.1:5000", "disks/fedora", "41")
        );
        assert_eq!(
            Dest::parse("docker://127.0.0.1:5000/d").expect("dest").tag,
            "latest"
        );
        assert!(Dest::parse("127.0.0.1:5000/d").is_err());
        assert!(Dest::parse("docker://127.0.0.1:5000/d@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef").is_err());
    }

    #[test]
    fn destinations_parse_as_the_import_reads_them() {
        let l = Local::parse("oci:/tmp/x:41").expect("oci");
        assert_eq!(
            (l.kind, l.path.as_path(), l.tag.as_str()),
            (Kind::Layout, std::path::Path::new("/tmp/x"), "41")
        );
        assert_eq!(Local::parse("oci:/tmp/x").expect("oci").tag, "latest");
        let l = Local::parse("oci-archive:/a/b.tar:v1").expect("archive");
        assert_eq!((l.kind, l.tag.as_str()), (Kind::OciArchive, "v1"));
        let l = Local::parse("docker-archive:/a/d.tar:cd/fedora:41").expect("docker");
        assert_eq!(
            (l.kind, l.path.as_path(), l.tag.as_str()),
            (
                Kind::DockerArchive,
                std::path::Path::new("/a/d.tar"),
                "cd/fedora:41"
            )
        );
        assert!(Local::is_local("oci:x") && !Local::is_local("docker://h/r:t"));
        assert!(Local::parse("oci:").is_err());
    }
}
