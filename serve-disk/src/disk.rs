//! Which file is the disk: the one regular file in the image's `/disk`.

use std::path::{Path, PathBuf};

/// Why the image's disk directory cannot be served.
#[derive(Debug)]
pub enum DiskError {
    Read {
        dir: PathBuf,
        source: std::io::Error,
    },
    NotRegular(PathBuf),
    NotOne {
        dir: PathBuf,
        count: usize,
    },
}

impl std::fmt::Display for DiskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskError::Read { dir, source } => {
                write!(f, "Invalid container image: {}: {source}", dir.display())
            }
            DiskError::NotRegular(p) => write!(
                f,
                "Invalid container image: {} is not a regular file",
                p.display()
            ),
            DiskError::NotOne { dir, count } => write!(
                f,
                "Invalid container image: {} must hold exactly one file, it holds {count}",
                dir.display()
            ),
        }
    }
}

impl std::error::Error for DiskError {}

/// The single regular file in `dir`; anything else is CDI's "Invalid container image".
/// A symlink is refused: it could point anywhere in the container.
pub fn find(dir: &Path) -> Result<PathBuf, DiskError> {
    let read = |source| DiskError::Read {
        dir: dir.to_path_buf(),
        source,
    };
    let entries = std::fs::read_dir(dir)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    for e in &entries {
        // CDI prints the directory's entries.
        println!("{}", e.path().display());
    }
    match entries.as_slice() {
        [one] if one.file_type().map_err(read)?.is_file() => Ok(one.path()),
        [one] => Err(DiskError::NotRegular(one.path())),
        _ => Err(DiskError::NotOne {
            dir: dir.to_path_buf(),
            count: entries.len(),
        }),
    }
}

/// A bootc / ostree image (`/sysroot` or `/ostree` in its root): a bootable container,
/// not a VM disk.
pub fn bootc(root: &Path) -> Option<&'static str> {
    ["sysroot", "ostree"]
        .into_iter()
        .find(|d| root.join(d).is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_regular_file() {
        let d = tempfile::tempdir().expect("tmp");
        assert!(find(d.path()).is_err());
        std::fs::write(d.path().join("disk.qcow2"), b"x").expect("write");
        assert_eq!(find(d.path()).expect("one"), d.path().join("disk.qcow2"));
        std::os::unix::fs::symlink("/etc/shadow", d.path().join("other")).expect("link");
        assert!(find(d.path())
            .expect_err("two")
            .to_string()
            .contains("exactly one"));
        std::fs::remove_file(d.path().join("disk.qcow2")).expect("rm");
        assert!(find(d.path())
            .expect_err("symlink")
            .to_string()
            .contains("not a regular file"));
    }
}
