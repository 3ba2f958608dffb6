//! Finding the disk in a containerDisk's layers, top layer first.
//!
//! The disk is the regular file directly under `disk/` that a container started from
//! the image would see: the topmost layer holding one wins, and whiteouts (`.wh.<name>`,
//! opaque `.wh..wh..opq` directories) in higher layers hide files below them (the OCI
//! overlay rules KubeVirt's own runtime applies). Reading from the top means the layer
//! with the disk is usually the first one downloaded and lower layers are never fetched.
//! Nothing here creates a file from a tar name.

use super::tar::TarFile;
use std::collections::HashSet;
use std::io::{self, Read};
use std::path::{Component, Path};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("reading image layer: {0}")]
    Read(#[source] io::Error),
    #[error("{path} in the image is a {kind}; the disk must be a regular file")]
    NotRegular { path: String, kind: &'static str },
    #[error("the image layer holds more than one disk file under /disk: {0}")]
    Several(String),
    #[error("no disk found: the image has no regular file under /disk")]
    None,
}

impl DiskError {
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            DiskError::Read(e) => {
                crate::error::io_kind(e).unwrap_or(crate::ErrorKind::CorruptImage)
            }
            _ => crate::ErrorKind::CorruptImage,
        }
    }
}

/// What the layers above the current one have hidden or replaced.
#[derive(Debug, Default)]
pub struct DiskFinder {
    /// Paths (normalised, e.g. `disk/x.img` or `disk`) deleted or replaced above.
    hidden: HashSet<String>,
    /// `disk/` was made opaque above: nothing below shows through.
    disk_opaque: bool,
}

/// Normalises a tar path: `./disk/x` and `/disk/x` -> `disk/x`. `None` for paths with
/// `..` (never part of a disk lookup).
fn normalise(p: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::CurDir | Component::RootDir => {}
            _ => return None,
        }
    }
    Some(parts.join("/"))
}

fn kind_name(t: tar::EntryType) -> &'static str {
    if t.is_symlink() {
        "symbolic link"
    } else if t.is_hard_link() {
        "hard link"
    } else if t.is_character_special() || t.is_block_special() {
        "device node"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_dir() {
        "directory"
    } else {
        "special file"
    }
}

impl DiskFinder {
    fn visible(&self, path: &str) -> bool {
        !(self.disk_opaque || self.hidden.contains(path) || self.hidden.contains("disk"))
    }

    /// Scans one layer's tar stream (decompressed). If this layer holds the visible
    /// disk, streams it through `f` and returns `Some`; the rest of the layer is read
    /// (to refuse a second disk file and let the caller verify the blob digest).
    pub fn scan_layer<R, T, E>(
        &mut self,
        reader: R,
        f: impl FnOnce(TarFile<'_>) -> Result<T, E>,
    ) -> Result<Option<T>, E>
    where
        R: Read,
        E: From<DiskError>,
    {
        let mut f = Some(f);
        let mut found: Option<(String, T)> = None;
        let below = self.walk(reader, |file| -> Result<(), E> {
            if let Some((first, _)) = &found {
                return Err(DiskError::Several(format!("/{first}, /{}", file.name)).into());
            }
            let f = f.take().expect("taken only when found is set");
            let (path, size) = (file.name.clone(), file.size);
            tracing::info!(path = %format!("/{path}"), size, "found the disk");
            found = Some((path, f(file)?));
            Ok(())
        })?;
        if found.is_none() {
            self.hide(below);
        }
        Ok(found.map(|(_, t)| t))
    }

    /// Every visible regular file under `disk/` in this layer, through `f` in tar order
    /// (a containerDisk whose `/disk` holds an overlay chain). What this layer holds
    /// hides the same paths in the layers below, as for [`DiskFinder::scan_layer`].
    pub fn scan_files<R, E>(
        &mut self,
        reader: R,
        f: impl FnMut(TarFile<'_>) -> Result<(), E>,
    ) -> Result<(), E>
    where
        R: Read,
        E: From<DiskError>,
    {
        let below = self.walk(reader, f)?;
        self.hide(below);
        Ok(())
    }

    fn hide(&mut self, (hidden, opaque): (Vec<String>, bool)) {
        self.hidden.extend(hidden);
        self.disk_opaque |= opaque;
    }

    /// Reads one layer: `visit` gets each visible regular file under `disk/` (and the
    /// rest of its bytes are skipped after it); returns what the layer hides below it.
    fn walk<R, E>(
        &self,
        reader: R,
        mut visit: impl FnMut(TarFile<'_>) -> Result<(), E>,
    ) -> Result<(Vec<String>, bool), E>
    where
        R: Read,
        E: From<DiskError>,
    {
        let mut archive = tar::Archive::new(reader);
        let mut layer_hidden = Vec::new();
        let mut layer_opaque = false;
        for entry in archive.entries().map_err(DiskError::Read)? {
            let mut entry = entry.map_err(DiskError::Read)?;
            let Some(path) = entry.path().ok().and_then(|p| normalise(&p)) else {
                continue;
            };
            let kind = entry.header().entry_type();
            let (dir, name) = match path.rsplit_once('/') {
                Some((d, n)) => (d.to_string(), n.to_string()),
                None => (String::new(), path.clone()),
            };
            // Whiteouts apply to the layers below this one.
            if name == OPAQUE {
                if dir == "disk" {
                    layer_opaque = true;
                }
                continue;
            }
            if let Some(target) = name.strip_prefix(WHITEOUT) {
                layer_hidden.push(if dir.is_empty() {
                    target.to_string()
                } else {
                    format!("{dir}/{target}")
                });
                continue;
            }
            if path == "disk" {
                if !kind.is_dir() && self.visible("disk") {
                    return Err(DiskError::NotRegular {
                        path: "/disk".into(),
                        kind: kind_name(kind),
                    }
                    .into());
                }
                if !kind.is_dir() {
                    layer_hidden.push(path);
                }
                continue;
            }
            if dir != "disk" {
                continue;
            }
            // Anything at disk/<name> hides the same path below, whatever it is.
            layer_hidden.push(path.clone());
            if !self.visible(&path) || kind.is_dir() {
                continue;
            }
            if !(kind.is_file() || kind.is_gnu_sparse() || kind.is_contiguous()) {
                return Err(DiskError::NotRegular {
                    path: format!("/{path}"),
                    kind: kind_name(kind),
                }
                .into());
            }
            let size = entry.size();
            visit(TarFile {
                name: path,
                size,
                reader: &mut entry,
            })?;
            io::copy(&mut entry, &mut io::sink()).map_err(DiskError::Read)?;
        }
        Ok((layer_hidden, layer_opaque))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            if kind.is_symlink() {
                h.set_link_name("/etc/shadow").expect("link");
            }
            h.set_path(name).expect("path");
            h.set_cksum();
            b.append(&h, *data).expect("append");
        }
        b.into_inner().expect("tar")
    }

    fn scan(f: &mut DiskFinder, l: &[u8]) -> Result<Option<(String, Vec<u8>)>, DiskError> {
        f.scan_layer(l, |t| {
            let mut v = Vec::new();
            t.reader.read_to_end(&mut v).map_err(DiskError::Read)?;
            Ok((t.name, v))
        })
    }

    use tar::EntryType::{Directory as D, Regular as R, Symlink as S};

    #[test]
    fn top_layer_wins() {
        let mut f = DiskFinder::default();
        let top = layer(&[("disk/", D, b""), ("./disk/top.img", R, b"TOP")]);
        assert_eq!(
            scan(&mut f, &top).expect("ok"),
            Some(("disk/top.img".into(), b"TOP".to_vec()))
        );
    }

    #[test]
    fn whiteouts_hide_lower_disks() {
        let mut f = DiskFinder::default();
        assert_eq!(
            scan(
                &mut f,
                &layer(&[("disk/.wh.a.img", R, b""), ("etc/x", R, b"1")])
            )
            .expect("ok"),
            None
        );
        assert!(matches!(
            scan(&mut f, &layer(&[("disk/a.img", R, b"A")])),
            Ok(None)
        ));
        assert_eq!(
            scan(&mut f, &layer(&[("disk/b.img", R, b"B")]))
                .expect("ok")
                .map(|x| x.1),
            Some(b"B".to_vec())
        );

        let mut f = DiskFinder::default();
        assert_eq!(
            scan(&mut f, &layer(&[("disk/.wh..wh..opq", R, b"")])).expect("ok"),
            None
        );
        assert_eq!(
            scan(&mut f, &layer(&[("disk/b.img", R, b"B")])).expect("ok"),
            None
        );

        let mut f = DiskFinder::default();
        assert_eq!(
            scan(&mut f, &layer(&[(".wh.disk", R, b"")])).expect("ok"),
            None
        );
        assert_eq!(
            scan(&mut f, &layer(&[("disk/b.img", R, b"B")])).expect("ok"),
            None
        );
    }

    #[test]
    fn links_and_several_files_are_refused() {
        let mut f = DiskFinder::default();
        let e = scan(&mut f, &layer(&[("disk/disk.img", S, b"")])).expect_err("symlink");
        assert!(
            e.to_string()
                .contains("/disk/disk.img in the image is a symbolic link"),
            "{e}"
        );
        let e =
            scan(&mut DiskFinder::default(), &layer(&[("disk", S, b"")])).expect_err("symlink dir");
        assert!(matches!(e, DiskError::NotRegular { .. }));
        let e = scan(
            &mut DiskFinder::default(),
            &layer(&[("disk/a", R, b"1"), ("disk/b", R, b"2")]),
        )
        .expect_err("two");
        assert!(e.to_string().ends_with("/disk/a, /disk/b"), "{e}");
    }

    #[test]
    fn files_elsewhere_are_not_disks() {
        let mut f = DiskFinder::default();
        assert_eq!(
            scan(
                &mut f,
                &layer(&[
                    ("disk/sub/x.img", R, b"X"),
                    ("data/disk.img", R, b"Y"),
                    ("disk.img", R, b"Z")
                ])
            )
            .expect("ok"),
            None
        );
    }
}
