//! A containerDisk whose `/disk` holds a chain of qcow2 overlays: the chain resolved
//! inside `/disk` only ([`resolve`], a pure function), then flattened top-down.

use super::errors::process_failure;
use super::layers::{counted, finish_flattened, flatten_one, layer_integrity, open_layer};
use super::open::open_disk;
use super::plan::DiskPlan;
use super::stream::drain;
use crate::failure::Failure;
use crate::sources::image::ContainerImage;
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::decode::containerdisk::{DiskError, DiskFinder};
use ferrydisk_common::error::chain_line;
use ferrydisk_common::pipeline::{self, PipelineError, Report};
use ferrydisk_common::progress::Progress;
use ferrydisk_common::sniff::Format;
use ferrydisk_common::ErrorKind;
use std::io::Read;
use std::sync::Arc;

/// The longest overlay chain under `/disk` that is read.
pub(super) const MAX_CHAIN_FILES: usize = 16;

/// A regular file under `/disk` seen by the chain scan.
pub(super) struct ChainFile {
    layer: usize,
    path: String,
    /// Its backing file name; an error for a qcow2 whose header is refused (`None`:
    /// not a qcow2).
    backing: Result<Option<String>, Option<String>>,
}

/// The file of `files` a backing name stands for: a sibling under `/disk`, named bare
/// (`base.qcow2`), `./base.qcow2` or `/disk/base.qcow2`. Anything else (another
/// directory, `..`, a host path) names nothing in the image.
pub(super) fn resolve_backing(files: &[ChainFile], name: &str) -> Option<usize> {
    let path = sibling_path(name)?;
    files.iter().position(|f| f.path == path)
}

/// The path under `/disk` a backing name can stand for; `None` when it names nothing
/// in the image, whatever the image holds.
pub(super) fn sibling_path(name: &str) -> Option<String> {
    let bare = name.strip_prefix("./").unwrap_or(name);
    let path = match bare.strip_prefix("/disk/") {
        Some(rest) => format!("disk/{rest}"),
        None => format!("disk/{bare}"),
    };
    let plain = path.matches('/').count() == 1 && !path.ends_with('/') && !path.contains("/.");
    plain.then_some(path)
}

/// Why the files under `/disk` are not one chain of qcow2 overlays.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum ChainError {
    /// Files of the top layer that no chain joins: several disks (`/disk/...` each).
    #[error("several files: {}", .0.join(", "))]
    Several(Vec<String>),
    #[error("{0} is not a qcow2 image: only chains of qcow2 overlays are read")]
    NotQcow2(String),
    #[error("{file}: {message}")]
    Header { file: String, message: String },
    #[error("{file} has backing file {name:?}, which is not another file of this image's /disk; backing files outside the image are refused")]
    Outside { file: String, name: String },
    #[error("the backing files under /disk form a loop")]
    Loop,
}

/// The chain the files under `/disk` form, top first, as indexes into `files` (listed
/// top layer first). The topmost layer holding files decides, as for one disk: its
/// files must all be in the chain, which may reach into lower layers; a backing name
/// must be another file of `/disk`.
pub(super) fn resolve(files: &[ChainFile]) -> Result<Vec<usize>, ChainError> {
    let shown = |i: usize| format!("/{}", files[i].path);
    let top_layer = files.first().map(|f| f.layer);
    let in_top: Vec<usize> = (0..files.len())
        .filter(|&i| Some(files[i].layer) == top_layer)
        .collect();
    let several = || ChainError::Several(in_top.iter().map(|&i| shown(i)).collect());
    let header = |i: usize| match &files[i].backing {
        Ok(b) => Ok(b.clone()),
        Err(None) if in_top.len() > 1 => Err(several()),
        Err(None) => Err(ChainError::NotQcow2(shown(i))),
        Err(Some(e)) => Err(ChainError::Header {
            file: shown(i),
            message: e.clone(),
        }),
    };
    let lower_of = |i: usize| -> Result<Option<usize>, ChainError> {
        let Some(name) = header(i)? else {
            return Ok(None);
        };
        resolve_backing(files, &name)
            .filter(|&j| j != i)
            .map(Some)
            .ok_or_else(|| ChainError::Outside {
                file: shown(i),
                name,
            })
    };
    // A backing name leaving the image is the first thing to say. The top: the one
    // file of the top layer no other file there names.
    let mut named = vec![false; files.len()];
    for &i in &in_top {
        if let Some(j) = lower_of(i)? {
            named[j] = true;
        }
    }
    let tops: Vec<usize> = in_top.iter().copied().filter(|&i| !named[i]).collect();
    let [top] = tops[..] else {
        return Err(if tops.is_empty() {
            ChainError::Loop
        } else {
            several()
        });
    };
    let mut chain = vec![top];
    let mut last = top;
    while let Some(next) = lower_of(last)? {
        if chain.contains(&next) {
            return Err(ChainError::Loop);
        }
        chain.push(next);
        last = next;
    }
    if in_top.iter().any(|i| !chain.contains(i)) {
        return Err(several());
    }
    Ok(chain)
}

/// The first pass: each file under `/disk` with its qcow2 header's backing name (its
/// first 64 KiB read), top layer first, reading lower layers only while a backing name
/// that could name a file of the image is unresolved.
fn scan(image: &dyn ContainerImage, progress: &Arc<Progress>) -> Result<Vec<ChainFile>, Failure> {
    use ferrydisk_common::format::qcow2::header::Header;
    let n = image.layer_count();
    let mut finder = DiskFinder::default();
    let mut files: Vec<ChainFile> = Vec::new();
    for idx in (0..n).rev() {
        let mut layer = open_layer(image, idx, progress)?;
        pipeline::disk_files_in_layer(&mut layer, layer_integrity(image, idx), &mut finder, |f| {
            if files.len() == MAX_CHAIN_FILES {
                return Err(PipelineError::Disk(DiskError::Several(format!(
                    "more than {MAX_CHAIN_FILES} files"
                ))));
            }
            let mut head = Vec::with_capacity(64 << 10);
            f.reader
                .take(64 << 10)
                .read_to_end(&mut head)
                .map_err(PipelineError::Read)?;
            let backing = if head.starts_with(b"QFI\xfb") {
                Header::parse_layer(&head)
                    .map(|(_, b)| b)
                    .map_err(|e| Some(e.to_string()))
            } else {
                Err(None)
            };
            files.push(ChainFile {
                layer: idx,
                path: f.name,
                backing,
            });
            Ok(())
        })
        .map_err(process_failure)?;
        drain(&mut layer)?;
        // Lower layers are read only while a backing name that could name a file under
        // /disk is still unresolved (a host path is refused without reading them).
        let resolved = files.iter().all(|f| match &f.backing {
            Ok(Some(name)) => {
                sibling_path(name).is_none() || resolve_backing(&files, name).is_some()
            }
            _ => true,
        });
        if !files.is_empty() && resolved {
            break;
        }
    }
    Ok(files)
}

/// A containerDisk whose `/disk` holds a chain of qcow2 overlays (`top.qcow2` backed by
/// `base.qcow2`, in one layer or in several), flattened top-down in bounded memory as
/// virter's layers are: a first pass over the layers reads each visible file's header
/// (its first 64 KiB), the chain is resolved inside `/disk` only, and then each file is
/// streamed once, top first, through the cluster-claim bitmap. Each layer holding a
/// chain file is downloaded again for it (its digest checked each time): no scratch.
pub(super) fn write_chain(
    plan: &DiskPlan,
    image: &dyn ContainerImage,
    progress: Arc<Progress>,
    why: &str,
) -> Result<TerminationMessage, Failure> {
    use ferrydisk_common::format::qcow2::layers::Stack;
    let refuse = |message: String| Failure::Process {
        kind: ErrorKind::UnsupportedFormat,
        message,
    };
    tracing::info!(image = %image.describe(), reason = why, "reading /disk as a chain of qcow2 overlays: the layers holding them are read again, once for their headers and once per file");
    let files = scan(image, &progress)?;
    let shown = |i: usize| format!("/{}", files[i].path);
    let chain = resolve(&files).map_err(|e| match e {
        ChainError::Several(all) => {
            process_failure(PipelineError::Disk(DiskError::Several(all.join(", "))))
        }
        other => refuse(other.to_string()),
    })?;
    let top = chain[0];
    let names: Vec<String> = chain.iter().map(|&i| shown(i)).collect();
    tracing::info!(chain = %names.join(" -> "), "flattening the overlay chain top-down");

    let mut disk = open_disk(plan, progress.clone(), None)?;
    let stack = Arc::new(Stack::default());
    let result = (|| {
        for &i in &chain {
            let f = &files[i];
            let mut layer = open_layer(image, f.layer, &progress)?;
            let mut done = false;
            let mut finder = DiskFinder::default();
            let integrity = layer_integrity(image, f.layer);
            pipeline::disk_files_in_layer(&mut layer, integrity, &mut finder, |t| {
                if done || t.name != f.path {
                    return Ok(());
                }
                done = true;
                flatten_one(&mut counted(t.reader, &progress), &mut disk, &stack)
                    .map_err(|e| pipeline::format_error(e, None))
            })
            .map_err(|e| Failure::Process {
                kind: e.kind(),
                message: format!("{}: {}", shown(i), chain_line(&e)),
            })?;
            drain(&mut layer)?;
            if !done {
                return Err(refuse(format!(
                    "{} was not found again in layer {}",
                    shown(i),
                    f.layer
                )));
            }
        }
        Ok(())
    })();
    let report = Report {
        layers: vec![Format::Tar],
        format: Some(Format::Qcow2),
        tar_entry: Some(files[top].path.clone()),
        ..Default::default()
    };
    finish_flattened(plan, image, disk, &stack, &progress, report, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(layer: usize, name: &str, backing: Option<&str>) -> ChainFile {
        ChainFile {
            layer,
            path: format!("disk/{name}"),
            backing: Ok(backing.map(str::to_string)),
        }
    }

    #[test]
    fn a_chain_resolves_top_first_across_layers() {
        let files = [
            file(2, "top.qcow2", Some("mid.qcow2")),
            file(2, "mid.qcow2", Some("/disk/base.qcow2")),
            file(1, "base.qcow2", None),
        ];
        assert_eq!(resolve(&files), Ok(vec![0, 1, 2]));
        let files = [
            file(1, "top.qcow2", Some("./base.qcow2")),
            file(0, "base.qcow2", None),
        ];
        assert_eq!(resolve(&files), Ok(vec![0, 1]));
    }

    #[test]
    fn backing_files_outside_the_image_are_refused() {
        for name in [
            "/var/lib/base.qcow2",
            "../base.qcow2",
            "sub/base.qcow2",
            "gone.qcow2",
        ] {
            let files = [
                file(1, "top.qcow2", Some(name)),
                file(1, "base.qcow2", None),
            ];
            assert!(
                matches!(resolve(&files), Err(ChainError::Outside { .. })),
                "{name}"
            );
        }
    }

    #[test]
    fn loops_and_strangers_are_refused() {
        let files = [
            file(1, "a.qcow2", Some("b.qcow2")),
            file(1, "b.qcow2", Some("a.qcow2")),
        ];
        assert_eq!(resolve(&files), Err(ChainError::Loop));
        let files = [file(1, "a.qcow2", None), file(1, "b.qcow2", None)];
        assert_eq!(
            resolve(&files),
            Err(ChainError::Several(vec![
                "/disk/a.qcow2".into(),
                "/disk/b.qcow2".into()
            ]))
        );
        let files = [ChainFile {
            layer: 0,
            path: "disk/disk.img".into(),
            backing: Err(None),
        }];
        assert_eq!(
            resolve(&files),
            Err(ChainError::NotQcow2("/disk/disk.img".into()))
        );
        // A file of the top layer left out of the chain: two disks.
        let files = [
            file(1, "top.qcow2", Some("base.qcow2")),
            file(1, "other.qcow2", Some("base.qcow2")),
            file(1, "base.qcow2", None),
        ];
        assert!(matches!(resolve(&files), Err(ChainError::Several(_))));
    }
}
