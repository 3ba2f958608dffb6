//! `importer import`: the CDI importer's main flow (contract section 1.5): pick the
//! source, open it, hand it to the blocking write half in `disk.rs`.

use crate::cli::{parse_go_bool, ImportArgs};
use crate::destination::Destination;
use crate::disk::{blocking, write_image, write_stream, DiskPlan, DiskRequest, Parsing};
use crate::failure::Failure;
use crate::sources::image::ContainerImage;
use crate::sources::{client, http, local_image, node, redact, registry};
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::progress::Progress;
use ferrydisk_common::stream::CountingReader;
use ferrydisk_common::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// Settings parsed and checked before anything touches the network or the disk.
pub struct Plan {
    pub args: ImportArgs,
    pub disk: DiskPlan,
}

impl Plan {
    pub fn new(args: ImportArgs) -> Result<Self, Failure> {
        let archive = match args.content_type.as_str() {
            "" | "kubevirt" => false,
            "archive" => true,
            other => return Err(Failure::Config(format!("Unknown content type: {other}"))),
        };
        let disk = DiskPlan::new(
            DiskRequest {
                volume: &args.volume,
                dest: args.dest.as_deref(),
                archive,
                preallocation: args.preallocation.as_deref(),
                image_size: &args.image_size,
                checksum: args.checksum.as_deref(),
            },
            Parsing::Strict,
        )?;
        Ok(Plan { args, disk })
    }
}

/// Runs the import inside one span naming the source and the (redacted) endpoint;
/// `Ok(None)` is a success that writes no termination message.
pub async fn run(
    plan: Plan,
    progress: Arc<Progress>,
) -> Result<Option<TerminationMessage>, Failure> {
    let span = tracing::info_span!(
        "import",
        source = %plan.args.source,
        endpoint = %redact::url(&plan.args.endpoint),
    );
    run_in_span(plan, progress).instrument(span).await
}

async fn run_in_span(
    plan: Plan,
    progress: Arc<Progress>,
) -> Result<Option<TerminationMessage>, Failure> {
    let source = plan.args.source.clone();
    let done_file = plan.args.done_file.clone();
    let msg = match source.as_str() {
        "none" => return plan.disk.create_blank(),
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

fn ca_dirs(a: &ImportArgs) -> Vec<PathBuf> {
    let mut dirs = vec![a.proxy_cert_dir.clone()];
    dirs.extend(a.cert_dir.clone());
    dirs
}

async fn import_http(plan: Plan, progress: Arc<Progress>) -> Result<TerminationMessage, Failure> {
    let endpoint = node::endpoint(&plan.args).await?;
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
        let reader = download.reader;
        let (d, p) = (disk.clone(), progress.clone());
        let result = blocking(move || write_stream(&d, reader, content_length, p, None)).await;
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
        msg.labels = node::labels(&client, &endpoint).await;
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
    let again = file.try_clone().map_err(|e| Failure::Process {
        kind: ErrorKind::Io,
        message: format!("reopening {}: {e}", path.display()),
    })?;
    tracing::info!(source = "file", path = %path.display(), dest = %plan.disk.dest.path().display(), "starting import");
    let counter = progress.clone();
    let reader = CountingReader::new(file, move |n| counter.add_source(n));
    blocking(move || write_stream(&plan.disk, reader, len, progress, Some(Arc::new(again)))).await
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
    blocking(move || write_image(&plan.disk, image.as_ref(), progress)).await
}
