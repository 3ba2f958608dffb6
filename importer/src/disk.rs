//! The blocking write half, shared by import, upload (and later clone and push): the
//! disk plan, opening the destination, streaming a source through the pipeline onto it,
//! draining and verifying the source, then finishing (resize, fsync) or undoing the write.

use crate::cli::{parse_go_bool, VolumeArgs};
use crate::destination::{fs_available, Destination, FileSpace};
use crate::failure::Failure;
use crate::sources::image::ContainerImage;
use ferrydisk_common::cdi::space::{parse_overhead, parse_quantity};
use ferrydisk_common::cdi::termination::{ImportInfo, TerminationMessage};
use ferrydisk_common::checksum::{Checksum, HashingReader, Sha256Tap};
use ferrydisk_common::decode::containerdisk::{DiskError, DiskFinder};
use ferrydisk_common::decode::gzip::Integrity;
use ferrydisk_common::decode::tar::Staging;
use ferrydisk_common::error::chain_line;
use ferrydisk_common::pipeline::{self, PipelineError, Report};
use ferrydisk_common::progress::Progress;
use ferrydisk_common::sink::discard::DiscardTarget;
use ferrydisk_common::sink::sparse::{CopyError, WriterOptions};
use ferrydisk_common::sink::{BlockTarget, FileTarget, Qcow2Target, SparseWriter, Target};
use ferrydisk_common::sniff::Format;
use ferrydisk_common::ErrorKind;
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What a subcommand asks of the disk, as given (env vars and flags, unparsed).
pub struct DiskRequest<'a> {
    pub volume: &'a VolumeArgs,
    /// `--dest`, overriding CDI's choice between block device and `<data-dir>/disk.img`.
    pub dest: Option<&'a Path>,
    /// Archive content: unpacked into `--data-dir`.
    pub archive: bool,
    pub preallocation: Option<&'a str>,
    pub image_size: &'a str,
    pub checksum: Option<&'a str>,
}

/// How a bad value in a [`DiskRequest`] is treated: CDI's importer refuses it, CDI's
/// upload server falls back to the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsing {
    Strict,
    Lenient,
}

/// Why a streamed push falls back to the spool when the import needs a second pass
/// over the disk (a containerDisk's overlay chain).
pub const STREAM_RESTART: &str = "a streamed push cannot start the disk over";

/// A streamed push's target and the size the disk may reach.
pub type StreamSink = (Box<dyn Target>, u64);

/// How the bytes are written, whatever the source (import or upload).
pub struct DiskPlan {
    pub dest: Destination,
    pub preallocate: bool,
    pub requested: Option<u64>,
    pub overhead: f64,
    /// Every digest the source bytes must match (none, one, or several at once).
    pub checksum: Vec<Checksum>,
    /// O_DIRECT where the destination allows it (`CACHE_MODE=TRYNONE`).
    pub direct: bool,
    /// A mounted scratch volume, if any (CDI: a missing one means "required").
    pub scratch: Option<PathBuf>,
    /// Write the disk as qcow2 (`--output-format qcow2`; file destinations only): a
    /// qcow2 source is kept as it is, anything else goes through the qcow2 writer.
    pub qcow2_out: bool,
    /// qcow2 output with compressed clusters.
    pub qcow2_compress: bool,
    /// A block destination already reads as zeros: skip zero runs (`--target-zeroed`).
    pub target_zeroed: bool,
    /// `importer inspect`: the whole pipeline runs into a writer that keeps nothing, and
    /// what it found is left here instead of on a disk.
    pub inspect: Option<Arc<Inspected>>,
    /// A push streaming the disk as it is imported: the target (taken once) and the
    /// size the disk may reach.
    pub stream: Option<Mutex<Option<StreamSink>>>,
}

/// What an inspecting run found: the pipeline's report and the SHA-256 of the stream
/// it read (an HTTP body, a file, an artifact's blob).
#[derive(Default)]
pub struct Inspected {
    pub report: Mutex<Option<Report>>,
    pub source_sha256: Arc<Mutex<sha2::Sha256>>,
    pub hashed: std::sync::atomic::AtomicBool,
}

impl DiskPlan {
    /// The one constructor: every subcommand's disk settings are parsed here.
    pub fn new(r: DiskRequest<'_>, parsing: Parsing) -> Result<Self, Failure> {
        let strict = parsing == Parsing::Strict;
        let v = r.volume;
        // CDI exits 1 when PREALLOCATION does not parse. The controller always sets it;
        // for people running the binary by hand, unset means false.
        let preallocate = match r.preallocation {
            None => false,
            Some(s) => match parse_go_bool(s) {
                Some(b) => b,
                None if strict => {
                    return Err(Failure::Config(format!(
                        "Unable to parse PREALLOCATION {s:?}: expected a boolean"
                    )))
                }
                None => false,
            },
        };
        let requested = match r.image_size.trim() {
            "" => None,
            s => match parse_quantity(s) {
                Ok(q) => Some(q),
                Err(e) if strict => {
                    return Err(Failure::Config(format!("IMPORTER_IMAGE_SIZE: {e}")))
                }
                Err(_) => None,
            },
        };
        let checksum = match r.checksum {
            None => Vec::new(),
            Some(s) => Checksum::parse_list(s).map_err(|e| Failure::Config(e.to_string()))?,
        };
        let dest = Destination::choose(r.dest, &v.block_device, &v.data_dir, r.archive);
        let mut qcow2_out = v.output_format == "qcow2";
        if qcow2_out && matches!(dest, Destination::Block(_)) {
            if strict {
                return Err(Failure::Config(
                    "--output-format qcow2 needs a file destination, not a block device".into(),
                ));
            }
            qcow2_out = false;
        }
        Ok(DiskPlan {
            inspect: None,
            stream: None,
            qcow2_compress: qcow2_out && v.qcow2_compress,
            target_zeroed: v.target_zeroed,
            qcow2_out,
            preallocate,
            requested,
            overhead: parse_overhead(&v.filesystem_overhead),
            checksum,
            direct: v.direct(),
            dest,
            // Only a mounted scratch volume counts (CDI: a missing one means "required").
            scratch: v.scratch.is_dir().then(|| v.scratch.clone()),
        })
    }

    /// `IMPORTER_SOURCE=none`: the destination itself, with no source.
    pub fn create_blank(&self) -> Result<Option<TerminationMessage>, Failure> {
        crate::blank::create(&self.dest, self.requested, self.overhead, self.preallocate)
    }
}

/// An open disk destination (file or block device).
struct Disk {
    writer: SparseWriter,
    opts: pipeline::Options,
    /// The resize rule, for a file.
    space: Option<FileSpace>,
}

/// Runs part of the write half on a blocking thread (decoders are synchronous and
/// CPU-bound), inside the caller's span so its log lines name the import or upload.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .unwrap_or_else(|e| {
            Err(Failure::Process {
                kind: ErrorKind::Io,
                message: format!("pipeline thread failed: {e}"),
            })
        })
}

/// A local I/O failure; a full volume is `TooLarge` (by `io::ErrorKind`).
pub fn io_fail(what: String, e: io::Error) -> Failure {
    Failure::Process {
        kind: ferrydisk_common::error::io_kind(&e).unwrap_or(ErrorKind::Io),
        message: format!("{what}: {e}"),
    }
}

fn pipeline_options(
    plan: &DiskPlan,
    progress: Arc<Progress>,
    source_len: Option<u64>,
) -> pipeline::Options {
    pipeline::Options {
        limit: u64::MAX,
        source_len,
        progress,
        // Only a mounted scratch volume counts (CDI: a missing one means "required").
        scratch: plan.scratch.clone(),
        source_file: None,
        keep_qcow2: plan.qcow2_out,
        // A checksum the user gave covers the source's bytes as a layer digest does.
        integrity: if plan.checksum.is_empty() {
            Integrity::Crc
        } else {
            Integrity::Digest
        },
    }
}

fn open_disk(
    plan: &DiskPlan,
    progress: Arc<Progress>,
    source_len: Option<u64>,
) -> Result<Disk, Failure> {
    let mut opts = pipeline_options(plan, progress.clone(), source_len);
    let (target, space): (Box<dyn Target>, Option<FileSpace>) = match &plan.dest {
        _ if plan.stream.is_some() => {
            let taken = plan
                .stream
                .as_ref()
                .and_then(|s| s.lock().ok().and_then(|mut s| s.take()));
            let (t, limit) = taken.ok_or_else(|| Failure::Config(STREAM_RESTART.into()))?;
            opts.limit = limit;
            (t, None)
        }
        _ if plan.inspect.is_some() => (Box::new(DiscardTarget::default()), None),
        Destination::Dir(_) => {
            return Err(Failure::Config(
                "a disk image needs a file or block destination".into(),
            ))
        }
        Destination::File(path) => {
            let t = FileTarget::create(path, plan.preallocate, plan.direct)
                .map_err(|e| io_fail(format!("creating {}", path.display()), e))?;
            // Measured after truncation, so a rerun does not count the old image as used.
            let dir = parent_dir(path);
            let avail =
                fs_available(&dir).map_err(|e| io_fail(format!("statfs {}", dir.display()), e))?;
            let space = FileSpace::new(avail, plan.requested, plan.overhead);
            opts.limit = space.available;
            if plan.qcow2_out {
                let reader = std::fs::File::open(path)
                    .map_err(|e| io_fail(format!("opening {}", path.display()), e))?;
                let q = Qcow2Target::new(Box::new(t), reader);
                let q = if plan.qcow2_compress {
                    q.with_compression()
                } else {
                    q
                };
                (Box::new(q), Some(space))
            } else {
                (Box::new(t), Some(space))
            }
        }
        Destination::Block(path) => {
            let t = BlockTarget::open(path, plan.direct, plan.preallocate)
                .map_err(|e| io_fail(format!("opening {}", path.display()), e))?
                .assume_zeroed(plan.target_zeroed);
            opts.limit = t.size();
            (Box::new(t), None)
        }
    };
    let writer = SparseWriter::spawn(
        target,
        WriterOptions {
            limit: opts.limit,
            progress: Some(progress),
            ..Default::default()
        },
    );
    Ok(Disk {
        writer,
        opts,
        space,
    })
}

/// Resizes per CDI's rule, makes the disk durable and builds the success message.
fn finish_disk(
    plan: &DiskPlan,
    disk: Disk,
    report: &Report,
    labels: Option<BTreeMap<String, String>>,
) -> Result<TerminationMessage, Failure> {
    // A kept qcow2 is exactly as long as it came; raw disks follow CDI's resize rule.
    let final_len = report.kept_len.unwrap_or_else(|| {
        disk.space
            .map_or(report.virtual_size, |s| s.final_len(report.virtual_size))
    });
    if let Some(found) = &plan.inspect {
        if let Ok(mut r) = found.report.lock() {
            *r = Some(report.clone());
        }
    }
    let disk_progress = disk.opts.progress.clone();
    let (stats, info) = disk
        .writer
        .finish(final_len)
        .map_err(|e| Failure::Process {
            kind: e.kind(),
            message: e.to_string(),
        })?;
    log_done(report, Some((stats, final_len)));
    // A block device has every byte of the image written or explicitly zeroed.
    let preallocated =
        info.preallocated || (plan.preallocate && matches!(plan.dest, Destination::Block(_)));
    let mut message = TerminationMessage::import_complete(preallocated, labels);
    message.import_info = Some(import_info(report, &disk_progress));
    Ok(message)
}

/// Deckhouse's report of an import: the image under its layers, duration and speed.
fn import_info(report: &Report, progress: &Progress) -> ImportInfo {
    let s = progress.snapshot();
    ImportInfo::new(
        report.format.map_or("", |f| f.name()),
        s.decoded,
        report.virtual_size,
        s.source,
        progress.elapsed(),
    )
}

fn checksum_failure(e: ferrydisk_common::checksum::ChecksumError) -> Failure {
    Failure::Process {
        kind: ErrorKind::ChecksumMismatch,
        message: e.to_string(),
    }
}

/// The blocking half of a stream import or upload: pipeline, drain, checksum, finish.
/// Nothing is fsynced and reported before the whole source has been read and verified.
/// `file` is the same source as a local file, which lets formats read data that precedes
/// its tables again instead of holding it. `digested`: the source checks a digest over
/// every byte at its end (an artifact's blob).
pub fn write_stream(
    plan: &DiskPlan,
    source: impl Read,
    content_length: Option<u64>,
    progress: Arc<Progress>,
    file: Option<Arc<std::fs::File>>,
    digested: bool,
) -> Result<TerminationMessage, Failure> {
    let source: Box<dyn Read> = match &plan.inspect {
        Some(found) => {
            found
                .hashed
                .store(true, std::sync::atomic::Ordering::Relaxed);
            Box::new(Sha256Tap::new(source, found.source_sha256.clone()))
        }
        None => Box::new(source),
    };
    let mut src = HashingReader::new(source, plan.checksum.clone());
    if let Destination::Dir(dir) = &plan.dest {
        let mut opts = pipeline_options(plan, progress, content_length);
        opts.limit = FileSpace::new(
            fs_available(dir).map_err(|e| io_fail(format!("statfs {}", dir.display()), e))?,
            plan.requested,
            plan.overhead,
        )
        .available;
        let staging = Staging::create(dir).map_err(|e| {
            io_fail(
                format!("creating a staging directory in {}", dir.display()),
                e,
            )
        })?;
        let result = pipeline::unpack_archive(&mut src, staging.path(), &opts)
            .map_err(process_failure)
            .and_then(|report| {
                drain(&mut src)?;
                src.verify().map_err(checksum_failure)?;
                Ok(report)
            });
        let report = match result {
            Ok(r) => r,
            Err(f) => {
                staging.discard();
                return Err(f);
            }
        };
        staging.commit().map_err(|e| {
            io_fail(
                format!("moving the unpacked archive into {}", dir.display()),
                e,
            )
        })?;
        log_done(&report, None);
        return Ok(TerminationMessage::import_complete(false, None));
    }
    let mut disk = open_disk(plan, progress, content_length)?;
    disk.opts.source_file = file;
    if digested {
        disk.opts.integrity = Integrity::Digest;
    }
    let result = pipeline::write_disk(&mut src, &mut disk.writer, &disk.opts)
        .map_err(process_failure)
        .and_then(|r| {
            drain(&mut src)?;
            src.verify().map_err(checksum_failure)?;
            Ok(r)
        });
    match result {
        Ok(report) => finish_disk(plan, disk, &report, None),
        Err(f) => {
            disk.writer.abort();
            Err(f)
        }
    }
}

/// A raw byte stream written as it is, with no format detection (a block-device clone
/// carries the device's bytes, whatever they look like): the sinks' zero and size rules
/// apply, and a file destination is exactly as long as the stream.
pub fn write_raw(
    plan: &DiskPlan,
    source: &mut dyn Read,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    let mut disk = open_disk(plan, progress.clone(), None)?;
    let counted = {
        let p = progress.clone();
        move |n| p.add_decoded(n)
    };
    let mut counting = ferrydisk_common::stream::CountingReader::new(source, counted);
    let result = disk
        .writer
        .copy_from(&mut counting)
        .map_err(|e| match e {
            CopyError::Read(e) => process_failure(PipelineError::Read(e)),
            CopyError::Sink(e) => process_failure(PipelineError::Sink(e)),
        })
        .and_then(|n| {
            drain(&mut counting)?;
            Ok(n)
        });
    match result {
        Ok(n) => {
            let report = Report {
                format: Some(Format::Raw),
                virtual_size: n,
                kept_len: Some(n),
                ..Default::default()
            };
            finish_disk(plan, disk, &report, None)
        }
        Err(f) => {
            disk.writer.abort();
            Err(f)
        }
    }
}

/// The blocking half of a containerDisk import: layers from the top until one holds
/// the disk; lower layers are never read.
pub fn write_image(
    plan: &DiskPlan,
    image: &dyn ContainerImage,
    layer: &crate::sources::image::LayerSelector,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    if is_virter(image) {
        return write_layered(plan, image, progress);
    }
    let blob = crate::sources::image::disk_blob(image, layer).map_err(|m| Failure::Process {
        kind: ErrorKind::Config,
        message: m,
    })?;
    if let Some(idx) = blob {
        return write_blob(plan, image, idx, progress);
    }
    let mut disk = open_disk(plan, progress.clone(), None)?;
    let mut finder = DiskFinder::default();
    let mut fetched = 0u64;
    let result = (|| {
        for idx in (0..image.layer_count()).rev() {
            fetched += image.layer_size(idx);
            progress.set_source_total(Some(fetched));
            let mut layer = open_layer(image, idx, &progress)?;
            disk.opts.integrity = layer_integrity(image, idx);
            let found = match pipeline::write_disk_from_layer(
                &mut layer,
                &mut finder,
                &mut disk.writer,
                &disk.opts,
            ) {
                Err(e) if chain_hint(&e) => return Err(Chain(e.to_string())),
                r => r.map_err(process_failure)?,
            };
            if let Some(report) = found {
                if idx > 0 {
                    tracing::info!(
                        layer = idx,
                        below = idx,
                        "disk found; the layers below it are not downloaded"
                    );
                }
                return Ok(report);
            }
        }
        Err(Single(process_failure(PipelineError::Disk(
            DiskError::None,
        ))))
    })();
    match result {
        Ok(report) => {
            let labels =
                ferrydisk_common::cdi::labels::from_env(image.env().iter().map(String::as_str));
            tracing::info!(image = %image.describe(), labels = ?labels, "image labels");
            finish_disk(plan, disk, &report, Some(labels))
        }
        Err(Single(f)) => {
            disk.writer.abort();
            Err(f)
        }
        Err(Chain(why)) => {
            disk.writer.abort();
            write_chain(plan, image, progress, &why)
        }
    }
}

/// How the one-disk import of a containerDisk ended when it did not succeed.
enum Attempt {
    /// A failure to report.
    Single(Failure),
    /// `/disk` may hold an overlay chain (several files, or a qcow2 with a backing
    /// file): read it as one, naming why.
    Chain(String),
}
use Attempt::{Chain, Single};

impl From<Failure> for Attempt {
    fn from(f: Failure) -> Self {
        Single(f)
    }
}

/// A second file under `/disk`, or a qcow2 disk with a backing file: what a chain of
/// overlays looks like to the one-disk reader.
fn chain_hint(e: &PipelineError) -> bool {
    use ferrydisk_common::format::contract::FormatError;
    use ferrydisk_common::format::qcow2::header::Qcow2Error;
    matches!(
        e,
        PipelineError::Disk(DiskError::Several(_))
            | PipelineError::Format(FormatError::Qcow2(Qcow2Error::BackingFile(_)))
    )
}

/// The longest overlay chain under `/disk` that is read.
const MAX_CHAIN_FILES: usize = 16;

/// A regular file under `/disk` seen by the chain scan.
struct ChainFile {
    layer: usize,
    path: String,
    /// Its backing file name; an error for a qcow2 whose header is refused (`None`:
    /// not a qcow2).
    backing: Result<Option<String>, Option<String>>,
}

/// The file of `files` a backing name stands for: a sibling under `/disk`, named bare
/// (`base.qcow2`), `./base.qcow2` or `/disk/base.qcow2`. Anything else (another
/// directory, `..`, a host path) names nothing in the image.
fn resolve_backing(files: &[ChainFile], name: &str) -> Option<usize> {
    let path = sibling_path(name)?;
    files.iter().position(|f| f.path == path)
}

/// The path under `/disk` a backing name can stand for; `None` when it names nothing
/// in the image, whatever the image holds.
fn sibling_path(name: &str) -> Option<String> {
    let bare = name.strip_prefix("./").unwrap_or(name);
    let path = match bare.strip_prefix("/disk/") {
        Some(rest) => format!("disk/{rest}"),
        None => format!("disk/{bare}"),
    };
    let plain = path.matches('/').count() == 1 && !path.ends_with('/') && !path.contains("/.");
    plain.then_some(path)
}

/// One layer of a stack (a virter layer, a file of a `/disk` chain) converted into the
/// disk through the claim bitmap: only clusters no layer above decided are written.
fn flatten_one(
    r: &mut dyn Read,
    disk: &mut Disk,
    stack: &Arc<ferrydisk_common::format::qcow2::layers::Stack>,
) -> Result<(), ferrydisk_common::format::contract::FormatError> {
    let sopts = ferrydisk_common::format::contract::StreamOptions {
        limit: disk.opts.limit,
        scratch: disk.opts.scratch.clone(),
        layers: Some(stack.clone()),
        ..Default::default()
    };
    ferrydisk_common::format::qcow2::convert(r, &mut disk.writer, &sopts).map(|_| ())
}

/// `r`, its bytes counted as decoded image bytes.
fn counted<'a>(r: impl Read + 'a, progress: &Arc<Progress>) -> impl Read + 'a {
    let p = progress.clone();
    ferrydisk_common::stream::CountingReader::new(r, move |n| p.add_decoded(n))
}

/// After a stack was flattened (`result`): the disk finished with the top layer's
/// virtual size and the image's labels, or emptied.
fn finish_flattened(
    plan: &DiskPlan,
    image: &dyn ContainerImage,
    disk: Disk,
    stack: &ferrydisk_common::format::qcow2::layers::Stack,
    progress: &Progress,
    mut report: Report,
    result: Result<(), Failure>,
) -> Result<TerminationMessage, Failure> {
    if let Err(f) = result {
        disk.writer.abort();
        return Err(f);
    }
    report.virtual_size = stack.virtual_size();
    progress.set_virtual_total(Some(report.virtual_size));
    tracing::info!(
        layers = stack.layers(),
        virtual_size = report.virtual_size,
        "flattened the layered image"
    );
    let labels = ferrydisk_common::cdi::labels::from_env(image.env().iter().map(String::as_str));
    finish_disk(plan, disk, &report, Some(labels))
}

/// A containerDisk whose `/disk` holds a chain of qcow2 overlays (`top.qcow2` backed by
/// `base.qcow2`, in one layer or in several), flattened top-down in bounded memory as
/// virter's layers are: a first pass over the layers reads each visible file's header
/// (its first 64 KiB), the chain is resolved inside `/disk` only, and then each file is
/// streamed once, top first, through the cluster-claim bitmap. Each layer holding a
/// chain file is downloaded again for it (its digest checked each time): no scratch.
fn write_chain(
    plan: &DiskPlan,
    image: &dyn ContainerImage,
    progress: Arc<Progress>,
    why: &str,
) -> Result<TerminationMessage, Failure> {
    use ferrydisk_common::format::qcow2::{header::Header, layers::Stack};
    let refuse = |message: String| Failure::Process {
        kind: ErrorKind::UnsupportedFormat,
        message,
    };
    tracing::info!(image = %image.describe(), reason = why, "reading /disk as a chain of qcow2 overlays: the layers holding them are read again, once for their headers and once per file");
    let n = image.layer_count();
    let mut finder = DiskFinder::default();
    let mut files: Vec<ChainFile> = Vec::new();
    for idx in (0..n).rev() {
        let mut layer = open_layer(image, idx, &progress)?;
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
    let shown = |i: usize| format!("/{}", files[i].path);
    // As for one disk, the topmost layer holding files under /disk decides: its files
    // must all be in the chain, which may reach into lower layers.
    let top_layer = files.first().map(|f| f.layer);
    let in_top: Vec<usize> = (0..files.len())
        .filter(|&i| Some(files[i].layer) == top_layer)
        .collect();
    let several = || {
        let all: Vec<String> = in_top.iter().map(|&i| shown(i)).collect();
        process_failure(PipelineError::Disk(DiskError::Several(all.join(", "))))
    };
    let header = |i: usize| match &files[i].backing {
        Ok(b) => Ok(b.clone()),
        Err(None) if in_top.len() > 1 => Err(several()),
        Err(None) => Err(refuse(format!(
            "{} is not a qcow2 image: only chains of qcow2 overlays are read",
            shown(i)
        ))),
        Err(Some(e)) => Err(refuse(format!("{}: {e}", shown(i)))),
    };
    let lower_of = |i: usize| -> Result<Option<usize>, Failure> {
        let Some(name) = header(i)? else {
            return Ok(None);
        };
        resolve_backing(&files, &name)
            .filter(|&j| j != i)
            .map(Some)
            .ok_or_else(|| {
                refuse(format!(
                    "{} has backing file {name:?}, which is not another file of this image's /disk; backing files outside the image are refused",
                    shown(i)
                ))
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
            refuse("the backing files under /disk form a loop".into())
        } else {
            several()
        });
    };
    let mut chain = vec![top];
    while let Some(next) = lower_of(*chain.last().expect("not empty"))? {
        if chain.contains(&next) {
            return Err(refuse("the backing files under /disk form a loop".into()));
        }
        chain.push(next);
    }
    if in_top.iter().any(|i| !chain.contains(i)) {
        return Err(several());
    }
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

/// Layer `idx`'s stored bytes, its digest checked at its end; a failure names the layer.
fn open_layer<'a>(
    image: &'a dyn ContainerImage,
    idx: usize,
    progress: &Arc<Progress>,
) -> Result<Box<dyn Read + Send + 'a>, Failure> {
    image
        .open_layer(idx, progress.clone())
        .map_err(|e| Failure::Process {
            kind: ferrydisk_common::error::io_kind(&e).unwrap_or(ErrorKind::Io),
            message: format!("opening layer {idx} of {}: {e}", image.describe()),
        })
}

/// What vouches for layer `idx`'s bytes: its digest, checked when the layer reader
/// reaches its end, where the image records one (a docker-archive may not).
fn layer_integrity(image: &dyn ContainerImage, idx: usize) -> Integrity {
    match image.layer_info(idx).digest {
        Some(_) => Integrity::Digest,
        None => Integrity::Crc,
    }
}

/// virter's layer media type: a gzip'd bare qcow2 whose backing file is the layer below
/// it, named `./virter:layer:<diff id of that layer>`.
pub const VIRTER_LAYER: &str = "application/vnd.com.linbit.virter.layer.v1.qcow2.gzip";

fn is_virter(image: &dyn ContainerImage) -> bool {
    let n = image.layer_count();
    n > 0 && (0..n).all(|i| image.layer_info(i).media_type == VIRTER_LAYER)
}

/// The diff id a virter backing name stands for: `[./]virter:layer:sha256:<hex>`, a
/// sibling layer of the same image; anything else (a host path) is refused.
fn virter_backing(name: &str) -> Option<String> {
    let id = name
        .strip_prefix("./")
        .unwrap_or(name)
        .strip_prefix("virter:layer:")?;
    let hex = id.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}

/// A layered qcow2 image (virter), flattened top-down: each layer is streamed once
/// (gunzip, qcow2), its decided clusters claimed, lower layers filling only what no
/// layer above decided. Each backing name must be the diff id of the layer below, which
/// is checked over that layer's uncompressed bytes as it streams.
fn write_layered(
    plan: &DiskPlan,
    image: &dyn ContainerImage,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    use ferrydisk_common::checksum::tap_digest;
    use ferrydisk_common::format::qcow2::layers::Stack;
    let refuse = |message: String| Failure::Process {
        kind: ErrorKind::UnsupportedFormat,
        message,
    };
    let n = image.layer_count();
    tracing::info!(image = %image.describe(), layers = n, "a layered qcow2 image (virter): flattening its layers top-down");
    let mut disk = open_disk(plan, progress.clone(), None)?;
    let stack = Arc::new(Stack::default());
    let mut expected: Option<String> = None;
    let mut fetched = 0u64;
    let result = (|| {
        for idx in (0..n).rev() {
            fetched += image.layer_size(idx);
            progress.set_source_total(Some(fetched));
            let mut layer = open_layer(image, idx, &progress)?;
            let hasher = Arc::new(Mutex::new(sha2::Sha256::default()));
            {
                let gz = ferrydisk_common::decode::compression::decompressor(
                    Format::Gzip,
                    &mut layer,
                    layer_integrity(image, idx),
                )
                .map_err(|e| process_failure(PipelineError::Read(e)))?
                .expect("gzip is supported");
                let mut counted = counted(Sha256Tap::new(gz, hasher.clone()), &progress);
                flatten_one(&mut counted, &mut disk, &stack).map_err(|e| Failure::Process {
                    kind: e.kind(),
                    message: format!("layer {idx}: {}", chain_line(&e)),
                })?;
                drain(&mut counted)?;
            }
            // The compressed layer to its end: its digest is checked there.
            drain(&mut layer)?;
            let diff_id = tap_digest(&hasher);
            if let Some(want) = expected.take() {
                if diff_id != want {
                    return Err(refuse(format!(
                        "the layer above layer {idx} names backing layer {want}, but layer {idx} is {diff_id}"
                    )));
                }
            }
            match stack.backing() {
                Some(name) if idx > 0 => {
                    expected = Some(virter_backing(&name).ok_or_else(|| {
                        refuse(format!(
                            "layer {idx} has backing file {name:?}, which is not a layer of this image (virter:layer:sha256:<diff id>); backing files outside the image are refused"
                        ))
                    })?);
                }
                Some(name) => {
                    return Err(refuse(format!(
                        "the bottom layer has backing file {name:?}: there is no layer below it, and backing files outside the image are refused"
                    )))
                }
                None => {
                    if idx > 0 {
                        tracing::info!(layer = idx, "this layer has no backing file: the layers below it are not read");
                    }
                    break;
                }
            }
        }
        Ok(())
    })();
    let report = Report {
        layers: vec![Format::Gzip],
        format: Some(Format::Qcow2),
        ..Default::default()
    };
    finish_flattened(plan, image, disk, &stack, &progress, report, result)
}

/// An artifact whose layer blob is the disk itself (raw, qcow2, ..., possibly
/// compressed): streamed through the pipeline like an HTTP body, its digest checked
/// over every byte by the layer reader before the disk is reported.
fn write_blob(
    plan: &DiskPlan,
    image: &dyn ContainerImage,
    idx: usize,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    let info = image.layer_info(idx);
    tracing::info!(
        image = %image.describe(),
        layer = idx,
        digest = info.digest.unwrap_or("?"),
        media_type = info.media_type,
        title = info.title.unwrap_or(""),
        "the disk is a layer's blob (OCI artifact): streaming it as the disk blob"
    );
    let size = image.layer_size(idx);
    progress.set_source_total(Some(size));
    let layer = open_layer(image, idx, &progress)?;
    // The same blocking half as an HTTP body: pipeline, drain (the layer reader checks
    // the digest at its end), checksum, finish or abort.
    let digested = layer_integrity(image, idx) == Integrity::Digest;
    write_stream(plan, layer, Some(size), progress, None, digested)
}

/// Reads whatever follows the image in the source (tar padding, trailing bytes), so a
/// short body or a checksum covers the whole download.
fn drain(src: &mut dyn Read) -> Result<(), Failure> {
    io::copy(src, &mut io::sink())
        .map(|_| ())
        .map_err(|e| process_failure(PipelineError::Read(e)))
}

fn process_failure(e: PipelineError) -> Failure {
    Failure::Process {
        kind: e.kind(),
        message: chain_line(&e),
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

fn log_done(report: &Report, written: Option<(ferrydisk_common::sink::WriteStats, u64)>) {
    match written {
        Some((s, len)) => tracing::info!(
            format = %report.describe(),
            virtual_size = report.virtual_size,
            disk_size = len,
            data_bytes = s.data_bytes,
            zero_bytes = s.zero_bytes,
            tar_entry = ?report.tar_entry,
            "import complete"
        ),
        None => {
            tracing::info!(format = %report.describe(), bytes = report.virtual_size, "archive import complete")
        }
    }
}
