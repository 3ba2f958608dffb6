//! `importer import`: the CDI importer's main flow (contract section 1.5), streaming.

use crate::cli::{parse_go_bool, ImportArgs};
use crate::destination::{fs_available, Destination, FileSpace};
use crate::failure::Failure;
use crate::sources::image::ContainerImage;
use crate::sources::{blank, client, http, local_image, redact, registry};
use ferrydisk_common::checksum::{Checksum, HashingReader};
use ferrydisk_common::decode::containerdisk::{DiskError, DiskFinder};
use ferrydisk_common::decode::tar::Staging;
use ferrydisk_common::error::chain_line;
use ferrydisk_common::pipeline::{self, PipelineError, Report};
use ferrydisk_common::progress::Progress;
use ferrydisk_common::sink::sparse::WriterOptions;
use ferrydisk_common::sink::{BlockTarget, FileTarget, SparseWriter, Target};
use ferrydisk_common::space::{parse_overhead, parse_quantity};
use ferrydisk_common::stream::{ChannelReader, CountingReader};
use ferrydisk_common::termination::TerminationMessage;
use ferrydisk_common::ErrorKind;
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Settings parsed and checked before anything touches the network or the disk.
pub struct Plan {
    pub args: ImportArgs,
    pub disk: DiskPlan,
}

/// How the bytes are written, whatever the source (import or upload).
pub struct DiskPlan {
    pub dest: Destination,
    pub preallocate: bool,
    pub requested: Option<u64>,
    pub overhead: f64,
    pub checksum: Option<Checksum>,
    /// O_DIRECT where the destination allows it (`CACHE_MODE=TRYNONE`).
    pub direct: bool,
    /// A mounted scratch volume, if any (CDI: a missing one means "required").
    pub scratch: Option<PathBuf>,
    /// Write a qcow2 source as qcow2 (`--output-format qcow2`; file destinations only).
    pub keep_qcow2: bool,
}

impl Plan {
    pub fn new(args: ImportArgs) -> Result<Self, Failure> {
        // CDI exits 1 when PREALLOCATION does not parse. The controller always sets it;
        // for people running the binary by hand, unset means false.
        let preallocate = match args.preallocation.as_deref() {
            None => false,
            Some(s) => parse_go_bool(s).ok_or_else(|| {
                Failure::Config(format!(
                    "Unable to parse PREALLOCATION {s:?}: expected a boolean"
                ))
            })?,
        };
        let requested = match args.image_size.trim() {
            "" => None,
            s => Some(
                parse_quantity(s)
                    .map_err(|e| Failure::Config(format!("IMPORTER_IMAGE_SIZE: {e}")))?,
            ),
        };
        let checksum = match args
            .checksum
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            None => None,
            Some(s) => Some(Checksum::parse(s).map_err(|e| Failure::Config(e.to_string()))?),
        };
        let archive = match args.content_type.as_str() {
            "" | "kubevirt" => false,
            "archive" => true,
            other => return Err(Failure::Config(format!("Unknown content type: {other}"))),
        };
        let dest = Destination::choose(
            args.dest.as_deref(),
            &args.volume.block_device,
            &args.volume.data_dir,
            archive,
        );
        let keep_qcow2 = args.volume.output_format == "qcow2";
        if keep_qcow2 && matches!(dest, Destination::Block(_)) {
            return Err(Failure::Config(
                "--output-format qcow2 needs a file destination, not a block device".into(),
            ));
        }
        Ok(Plan {
            disk: DiskPlan {
                keep_qcow2,
                preallocate,
                requested,
                overhead: parse_overhead(&args.volume.filesystem_overhead),
                checksum,
                direct: args.volume.cache_mode == "TRYNONE",
                dest,
                scratch: args
                    .volume
                    .scratch
                    .is_dir()
                    .then(|| args.volume.scratch.clone()),
            },
            args,
        })
    }
}

/// Runs the import; `Ok(None)` is a success that writes no termination message.
pub async fn run(
    plan: Plan,
    progress: Arc<Progress>,
) -> Result<Option<TerminationMessage>, Failure> {
    let source = plan.args.source.clone();
    let done_file = plan.args.done_file.clone();
    let msg = match source.as_str() {
        "none" => {
            return blank::create(
                &plan.disk.dest,
                plan.disk.requested,
                plan.disk.overhead,
                plan.disk.preallocate,
            )
        }
        "http" => import_http(plan, progress).await?,
        "registry" => import_registry(plan, progress).await?,
        "s3" | "gcs" | "imageio" | "vddk" => {
            return Err(Failure::Connect {
                source_name: source.clone(),
                kind: ErrorKind::UnsupportedFormat,
                message: format!("the {source} source is not supported by ferrydisk"),
            });
        }
        other => return Err(Failure::UnknownSource(other.to_string())),
    };
    if let Some(done) = done_file {
        // CDI creates it O_EXCL and only logs a failure.
        if let Err(e) = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&done)
        {
            tracing::warn!(path = %done.display(), error = %e, "could not create done file");
        }
    }
    Ok(Some(msg))
}

fn blocking_failed(e: tokio::task::JoinError) -> Failure {
    Failure::Process {
        kind: ErrorKind::Io,
        message: format!("pipeline thread failed: {e}"),
    }
}

fn ca_dirs(a: &ImportArgs) -> Vec<PathBuf> {
    let mut dirs = vec![a.proxy_cert_dir.clone()];
    dirs.extend(a.cert_dir.clone());
    dirs
}

async fn import_http(plan: Plan, progress: Arc<Progress>) -> Result<TerminationMessage, Failure> {
    let endpoint = node_pull_endpoint(&plan.args).await?;
    let connect_err = |kind, message: String| Failure::Connect {
        source_name: "http".into(),
        kind,
        message,
    };
    if let Some(path) = local_path(&endpoint) {
        if !plan.args.allow_local_files {
            return Err(connect_err(
                ErrorKind::Config,
                "file:// endpoints need --allow-local-files (a flag, so a DataVolume's URL cannot read the importer pod's files)".into(),
            ));
        }
        return import_file(plan, &path, progress).await;
    }
    let a = &plan.args;
    let mut headers = client::collect_extra_headers(std::env::vars(), &a.extra_headers_dir);
    headers.extend(a.extra_headers.iter().cloned());
    let dirs = ca_dirs(a);
    let client = client::build(&client::ClientOptions {
        ca_dirs: dirs.iter().map(PathBuf::as_path).collect(),
        insecure: parse_go_bool(&a.insecure_tls).unwrap_or(false),
        headers,
        http_proxy: a.http_proxy.clone().filter(|s| !s.is_empty()),
        https_proxy: a.https_proxy.clone().filter(|s| !s.is_empty()),
        no_proxy: a.no_proxy.clone(),
        refuse_internal_redirects: a.refuse_internal_redirects,
    })
    .map_err(|e| connect_err(ErrorKind::Config, e.to_string()))?;
    let auth = match (&a.access_key_id, &a.secret_key) {
        (Some(u), Some(p)) if !u.is_empty() && !p.is_empty() => Some((u.clone(), p.clone())),
        _ => None,
    };
    tracing::info!(source = "http", endpoint = %redact::url(&endpoint), dest = %plan.disk.dest.path().display(), "starting import");
    let opts = http::HttpOptions {
        auth,
        retries: a.retries,
        idle_timeout: Duration::from_secs(a.idle_timeout.max(1)),
        progress: progress.clone(),
    };
    let node_pull = a.pull_method == "node";
    let disk = Arc::new(plan.disk);
    let mut restarts = 0;
    let mut msg = loop {
        let download = http::open(client.clone(), &endpoint, opts.clone())
            .await
            .map_err(|e| connect_err(e.kind(), e.to_string()))?;
        let content_length = download.content_length;
        let reader = ChannelReader::new(download.rx);
        let (d, p) = (disk.clone(), progress.clone());
        let result = tokio::task::spawn_blocking(move || write_http(&d, reader, content_length, p))
            .await
            .map_err(blocking_failed)?;
        match result {
            // The destination was emptied when the attempt failed; a new one rewrites it.
            Err(f) if f.kind() == ErrorKind::SourceChanged && restarts < MAX_RESTARTS => {
                restarts += 1;
                tracing::warn!(restart = restarts, error = %f.detail(), "the source changed under a resumed download; importing again from byte 0");
                progress.restart();
            }
            other => break other?,
        }
    };
    if node_pull {
        msg.labels = node_pull_labels(&client, &endpoint).await;
    }
    Ok(msg)
}

/// How often an import starts again from byte 0 because its source changed under a
/// resume, before it fails.
const MAX_RESTARTS: u32 = 3;

/// `file:///path` (a local user's disk, or a volume mounted into the pod).
fn local_path(endpoint: &str) -> Option<PathBuf> {
    let url = reqwest::Url::parse(endpoint).ok()?;
    (url.scheme() == "file").then(|| url.to_file_path().ok())?
}

/// A local file streams through the same pipeline, and is also handed to it as a file:
/// formats whose data precedes its tables read it again instead of spooling.
async fn import_file(
    plan: Plan,
    path: &Path,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    let file = std::fs::File::open(path).map_err(|e| Failure::Connect {
        source_name: "http".into(),
        kind: ErrorKind::SourceRefused,
        message: format!("opening {}: {e}", path.display()),
    })?;
    let len = file.metadata().ok().map(|m| m.len());
    progress.set_source_total(len);
    let again = file
        .try_clone()
        .map_err(|e| io_fail(format!("reopening {}", path.display()), e))?;
    tracing::info!(source = "file", path = %path.display(), dest = %plan.disk.dest.path().display(), "starting import");
    let counter = progress.clone();
    let reader = CountingReader::new(file, move |n| counter.add_source(n));
    tokio::task::spawn_blocking(move || {
        write_stream(&plan.disk, reader, len, progress, Some(Arc::new(again)))
    })
    .await
    .map_err(blocking_failed)?
}

/// Node pull: the server inside the containerDisk container serves its environment (the
/// image's ENV) at `/info`; its KUBEVIRT_IO_ entries become labels, as with a registry.
async fn node_pull_labels(
    client: &reqwest::Client,
    endpoint: &str,
) -> Option<BTreeMap<String, String>> {
    let mut url = reqwest::Url::parse(endpoint).ok()?;
    url.set_path("/info");
    let info: serde_json::Value = match client.get(url).send().await {
        Ok(r) => serde_json::from_slice(&r.bytes().await.ok()?).ok()?,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the image environment from the disk server");
            return None;
        }
    };
    let env: Vec<String> = serde_json::from_value(info.get("env")?.clone()).ok()?;
    let labels = ferrydisk_common::labels::from_env(env.iter().map(String::as_str));
    (!labels.is_empty()).then_some(labels)
}

async fn import_registry(
    plan: Plan,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    if matches!(plan.disk.dest, Destination::Dir(_)) {
        return Err(Failure::Config(
            "registry imports require content type kubevirt".into(),
        ));
    }
    let a = &plan.args;
    let opts = registry::RegistryOptions {
        username: a.access_key_id.clone(),
        password: a.secret_key.clone(),
        auth_file: a.auth_file.clone(),
        insecure: parse_go_bool(&a.insecure_tls).unwrap_or(false),
        ca_dirs: ca_dirs(a),
        arch: a.registry_arch.clone().filter(|s| !s.is_empty()),
        retries: a.retries,
        idle_timeout: Duration::from_secs(a.idle_timeout.max(1)),
        https_proxy: a.https_proxy.clone().filter(|s| !s.is_empty()),
        http_proxy: a.http_proxy.clone().filter(|s| !s.is_empty()),
        no_proxy: a.no_proxy.clone(),
    };
    tracing::info!(source = "registry", endpoint = %a.endpoint, dest = %plan.disk.dest.path().display(), "starting import");
    let fail = |e: registry::RegistryError| Failure::Process {
        kind: e.kind(),
        message: e.to_string(),
    };
    let image: Box<dyn ContainerImage> =
        match local_image::open(&a.endpoint, opts.arch.as_deref()).map_err(fail)? {
            Some(local) => Box::new(local),
            None => Box::new(registry::resolve(&a.endpoint, &opts).await.map_err(fail)?),
        };
    tokio::task::spawn_blocking(move || write_image(&plan.disk, image.as_ref(), progress))
        .await
        .map_err(blocking_failed)?
}

/// An open disk destination (file or block device).
struct Disk {
    writer: SparseWriter,
    opts: pipeline::Options,
    /// The resize rule, for a file.
    space: Option<FileSpace>,
}

fn io_fail(what: String, e: io::Error) -> Failure {
    Failure::Process {
        kind: ErrorKind::Io,
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
        keep_qcow2: plan.keep_qcow2,
    }
}

fn open_disk(
    plan: &DiskPlan,
    progress: Arc<Progress>,
    source_len: Option<u64>,
) -> Result<Disk, Failure> {
    let mut opts = pipeline_options(plan, progress.clone(), source_len);
    let (target, space): (Box<dyn Target>, Option<FileSpace>) = match &plan.dest {
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
            (Box::new(t), Some(space))
        }
        Destination::Block(path) => {
            let t = BlockTarget::open(path, plan.direct)
                .map_err(|e| io_fail(format!("opening {}", path.display()), e))?;
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
    Ok(TerminationMessage::import_complete(preallocated, labels))
}

fn checksum_failure(e: ferrydisk_common::checksum::ChecksumError) -> Failure {
    Failure::Process {
        kind: ErrorKind::ChecksumMismatch,
        message: e.to_string(),
    }
}

/// The blocking half of an HTTP import: pipeline, drain, checksum, finish. Nothing is
/// fsynced and reported before the whole source has been read and verified.
pub fn write_http(
    plan: &DiskPlan,
    source: ChannelReader,
    content_length: Option<u64>,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    write_stream(plan, source, content_length, progress, None)
}

/// [`write_http`] for any byte stream; `file` is the same source as a local file, which
/// lets formats read data that precedes its tables again instead of holding it.
fn write_stream(
    plan: &DiskPlan,
    source: impl Read,
    content_length: Option<u64>,
    progress: Arc<Progress>,
    file: Option<Arc<std::fs::File>>,
) -> Result<TerminationMessage, Failure> {
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

/// The blocking half of a containerDisk import: layers from the top until one holds
/// the disk; lower layers are never read.
fn write_image(
    plan: &DiskPlan,
    image: &dyn ContainerImage,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    let mut disk = open_disk(plan, progress.clone(), None)?;
    let mut finder = DiskFinder::default();
    let mut fetched = 0u64;
    let result = (|| {
        for idx in (0..image.layer_count()).rev() {
            fetched += image.layer_size(idx);
            progress.set_source_total(Some(fetched));
            let mut layer =
                image
                    .open_layer(idx, progress.clone())
                    .map_err(|e| Failure::Process {
                        kind: ErrorKind::Io,
                        message: format!("opening layer {idx} of {}: {e}", image.describe()),
                    })?;
            if let Some(report) = pipeline::write_disk_from_layer(
                &mut layer,
                &mut finder,
                &mut disk.writer,
                &disk.opts,
            )
            .map_err(process_failure)?
            {
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
        Err(process_failure(PipelineError::Disk(DiskError::None)))
    })();
    match result {
        Ok(report) => {
            let labels = ferrydisk_common::labels::from_env(image.env().iter().map(String::as_str));
            tracing::info!(image = %image.describe(), labels = ?labels, "image labels");
            finish_disk(plan, disk, &report, Some(labels))
        }
        Err(f) => {
            disk.writer.abort();
            Err(f)
        }
    }
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

/// Node pull: wait for the ready file, whose content names the disk file served at the
/// endpoint's directory (contract section 3). CDI waits 60 s; we wait `--ready-timeout`.
async fn node_pull_endpoint(args: &ImportArgs) -> Result<String, Failure> {
    let Some(ready) = &args.ready_file else {
        return Ok(args.endpoint.clone());
    };
    let start = std::time::Instant::now();
    let mut last_log = start;
    while !ready.exists() {
        if start.elapsed() >= Duration::from_secs(args.ready_timeout) {
            return Err(Failure::ReadyTimeout(ready.display().to_string()));
        }
        if last_log.elapsed() >= Duration::from_secs(30) {
            tracing::info!(file = %ready.display(), waited_s = start.elapsed().as_secs(), "waiting for ready file");
            last_log = std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let name = std::fs::read_to_string(ready).unwrap_or_default();
    let name = name.trim();
    if name.is_empty() || name.contains('/') {
        return Ok(args.endpoint.clone());
    }
    Ok(format!(
        "{}{name}",
        args.endpoint.trim_end_matches("disk.img")
    ))
}
