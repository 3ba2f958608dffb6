//! A resumable upload's state on the filesystem volume, beside `disk.img`: enough for a
//! restarted upload server to take the same upload back where a writer checkpoint
//! left it. Written (to a temporary name, fsynced, renamed) at creation and at each
//! checkpoint; removed when the upload ends either way.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

const VERSION: u32 = 1;
/// A state file larger than this is not ours.
const MAX_LEN: u64 = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Saved {
    pub version: u32,
    pub id: String,
    /// `Upload-Length`.
    pub length: u64,
    /// Source bytes whose effect on the disk is fsynced.
    pub offset: u64,
    /// The format of the image as its first bytes say (`raw`, `qcow2`, ...), once known:
    /// only a raw image's stream can be picked up in the middle.
    pub format: Option<String>,
    /// `sha256:<hex>` of the image's first bytes (see `HEAD_LEN`), once they came.
    pub head: Option<String>,
    /// Whole-image digests given at creation, `algorithm:hex`.
    pub checksums: Vec<String>,
    /// Algorithms hashed for a digest the last PATCH brings.
    pub algorithms: Vec<String>,
}

impl Saved {
    pub fn new(id: &str, length: u64, checksums: Vec<String>, algorithms: Vec<String>) -> Self {
        Saved {
            version: VERSION,
            id: id.into(),
            length,
            offset: 0,
            format: None,
            head: None,
            checksums,
            algorithms,
        }
    }
}

/// `disk.img` -> `disk.img.upload-state`.
pub fn path_for(disk: &Path) -> PathBuf {
    let mut name = disk.file_name().unwrap_or_default().to_os_string();
    name.push(".upload-state");
    disk.with_file_name(name)
}

/// Replaces the state atomically and durably.
pub fn save(path: &Path, saved: &Saved) -> io::Result<()> {
    let tmp = path.with_extension("upload-state.tmp");
    let json = serde_json::to_vec(saved).map_err(io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&json)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The saved state, if there is a file; an unreadable or foreign one is an error.
pub fn load(path: &Path) -> Option<Result<Saved, String>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Err(format!("reading {}: {e}", path.display()))),
    };
    let mut buf = Vec::new();
    if let Err(e) = f.take(MAX_LEN + 1).read_to_end(&mut buf) {
        return Some(Err(format!("reading {}: {e}", path.display())));
    }
    if buf.len() as u64 > MAX_LEN {
        return Some(Err(format!(
            "{} is larger than a state file",
            path.display()
        )));
    }
    Some(
        serde_json::from_slice::<Saved>(&buf)
            .map_err(|e| format!("{} is not an upload state: {e}", path.display()))
            .and_then(|s| match s.version {
                VERSION if s.offset <= s.length => Ok(s),
                VERSION => Err(format!("{}: offset past the length", path.display())),
                v => Err(format!("{}: unknown version {v}", path.display())),
            }),
    )
}

pub fn remove(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not remove the upload state")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_loads_and_refuses_what_is_not_ours() {
        let dir = tempfile::tempdir().expect("state");
        let disk = dir.path().join("disk.img");
        let p = path_for(&disk);
        assert_eq!(p, dir.path().join("disk.img.upload-state"));
        assert!(load(&p).is_none());
        let mut s = Saved::new("abc", 100, vec![], vec!["sha256".into()]);
        s.offset = 64;
        save(&p, &s).expect("state");
        assert_eq!(load(&p).expect("state").expect("state"), s);
        std::fs::write(&p, b"{\"version\":1}").expect("state");
        assert!(load(&p).expect("state").is_err());
        s.offset = 101;
        save(&p, &s).expect("state");
        assert!(load(&p).expect("state").is_err());
        remove(&p);
        assert!(load(&p).is_none());
    }
}
